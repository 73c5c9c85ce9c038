"""The recurrent layer's own per-sample gradients are exact, its fast path is nn.LSTM / nn.GRU,
and every default model is one Opacus accepts and can step on an empty Poisson batch."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.tasks import get_task
from client.training import DPConfig, LocalTrainingConfig, grad_sample_mode_for, train_local
from models import build_model
from models.layers import keep_batch_gradients
from models.recurrent import VitalsRNN
from server.settings import compose

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off",
                                        "ignore:Full backward hook",
                                        "ignore:std\\(\\)")  # std over an empty batch


def _small_rnn(cell: str, num_layers: int = 2) -> VitalsRNN:
    torch.manual_seed(0)
    return VitalsRNN(num_variables=2, num_static=3, num_classes=3, cell=cell, hidden_size=5,
                     num_layers=num_layers, static_size=4).double()


def _batch(n: int = 6, hours: int = 7):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(n, hours, 6, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_per_sample_gradients_equal_one_backward_per_patient(cell):
    model = _small_rnn(cell)
    series, static, labels = _batch()
    brute = {name: [] for name, _ in model.named_parameters()}
    for i in range(len(labels)):  # one patient at a time: the definition of a per-sample grad
        model.zero_grad()
        nn.functional.cross_entropy(model(series[i:i + 1], static[i:i + 1]),
                                    labels[i:i + 1]).backward()
        for name, p in model.named_parameters():
            brute[name].append(p.grad.clone())
    model.zero_grad()
    hooked = GradSampleModule(model)  # the mean loss: Opacus rescales by the batch size
    nn.functional.cross_entropy(hooked(series, static), labels).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad_sample, torch.stack(brute[name]), atol=1e-10), name
    # autograd's batch gradient: the mean of the per-sample ones where it is computed; the
    # recurrent layers leave it unset (DP-SGD replaces p.grad by the noised clipped sum)
    for name, p in model.named_parameters():
        if name.startswith("rnn."):
            assert p.grad is None, name
        else:
            assert torch.allclose(p.grad, p.grad_sample.mean(0), atol=1e-10), name
    hooked._close()


@pytest.mark.parametrize(("cell", "fused"), [("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_fast_path_is_torch_rnn_and_the_dp_path_computes_the_same(cell, fused):
    model = _small_rnn(cell)
    series, _, _ = _batch()
    reference = fused(6, 5, num_layers=2, batch_first=True).double()
    weights = {}
    for i, layer in enumerate(model.rnn.layers):
        weights |= {f"{name}_l{i}": p for name, p in layer.named_parameters()}
    reference.load_state_dict(weights)
    fast = model.rnn(series)
    assert torch.equal(fast, reference(series)[0])
    hooked = GradSampleModule(model)  # hooks on the recurrence switch to the DP path
    assert torch.allclose(model.rnn(series), fast, atol=1e-12)
    hooked._close()
    assert not model.rnn.layers[0]._forward_hooks  # back to the fused kernel


@pytest.mark.slow
def test_dp_training_leaves_a_model_with_the_plain_models_state_dict():
    cfg = compose(["task=vitals"])
    spec = get_task("vitals").input_spec(cfg["task"])
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 48, 3 * spec["num_variables"], generator=gen),
                         torch.randn(40, spec["num_static"], generator=gen),
                         torch.randint(0, 2, (40,), generator=gen))
    torch.manual_seed(0)
    private = build_model(cfg["model"], spec)
    plain = build_model(cfg["model"], spec)
    before = {k: v.clone() for k, v in private.state_dict().items()}
    result = train_local(private, data, LocalTrainingConfig(batch_size=16, lr=0.01), seed=0,
                         dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert result["steps"] == 3
    shapes = {k: v.shape for k, v in private.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(not torch.equal(before[k], v) for k, v in private.state_dict().items())
    plain.load_state_dict(private.state_dict())  # DP-trained -> a plain site and back
    private.load_state_dict(plain.state_dict())
    assert all(not m._forward_hooks and not m._backward_hooks for m in private.modules())
    x, s, _ = data.tensors
    assert torch.equal(private.eval()(x, s), plain.eval()(x, s))


def _random_inputs(task: str, spec: dict):
    """n random records shaped like ``task``'s model inputs."""
    return {
        "images": lambda n: (torch.randn(n, spec["channels"], spec["image_size"],
                                         spec["image_size"]),),
        "vitals": lambda n: (torch.randn(n, 48, 3 * spec["num_variables"]),
                             torch.randn(n, spec["num_static"])),
        "notes": lambda n: (torch.randint(1, spec["vocab_buckets"], (n, 16, 2)),
                            torch.ones(n, 16, dtype=torch.bool)),
        "tabular": lambda n: (torch.randn(n, spec["num_features"]),),
    }[task]


@pytest.mark.parametrize("task", ["images", "vitals", "notes", "tabular"])
def test_default_models_are_valid_for_opacus_and_step_on_an_empty_poisson_batch(task):
    cfg = compose([f"task={task}"])
    spec = get_task(task).input_spec(cfg["task"])
    torch.manual_seed(0)
    model = build_model(cfg["model"], spec)
    assert ModuleValidator.validate(model, strict=True) == []
    assert grad_sample_mode_for(model, DPConfig(1.0, 1.0)) == "hooks"
    inputs = _random_inputs(task, spec)
    loader = DataLoader(TensorDataset(*inputs(8), torch.arange(8) % 2), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, wrap_model=False, grad_sample_mode="hooks")
    before = [p.detach().clone() for p in model.parameters()]
    # Poisson sampling draws empty batches; the step is still taken and noised (never skipped)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(*inputs(0)), torch.zeros(0, dtype=torch.long)).backward()
    optimizer.step()
    hooks.cleanup()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("conv", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2},  # the last input column is never covered
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (2, 1),
     "groups": 2, "bias": False},
    {"kernel_size": 3, "padding": "same"},  # Opacus's own sampler
])
@pytest.mark.parametrize("conv_class", ["torch", "medsilo"])
def test_conv2d_per_sample_gradients_equal_one_backward_per_scan(conv, conv_class):
    """Two convolutions, so that the second passes an input gradient back to the first:
    ``nn.Conv2d`` and models/layers.py's ``Conv2d`` (no batch weight gradient under DP)."""
    import models.dp_conv  # noqa: F401  (its Conv2d sampler replaces Opacus's)
    from models.layers import Conv2d

    layer = {"torch": nn.Conv2d, "medsilo": Conv2d}[conv_class]
    if conv_class == "medsilo" and isinstance(conv.get("padding"), str):
        with pytest.raises(ValueError, match="zero padding given as numbers"):
            layer(4, 6, **conv)
        return
    torch.manual_seed(0)
    model = nn.Sequential(layer(4, 6, **conv), nn.Tanh(), layer(6, 4, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(3)).double()
    scans = torch.randn(5, 4, 9, 8, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    model(scans)  # sizes the lazy head
    brute = {name: [] for name, _ in model.named_parameters()}
    for i in range(len(labels)):
        model.zero_grad()
        nn.functional.cross_entropy(model(scans[i:i + 1]), labels[i:i + 1]).backward()
        for name, p in model.named_parameters():
            brute[name].append(p.grad.clone())
    model.zero_grad(set_to_none=True)
    hooked = GradSampleModule(model)
    nn.functional.cross_entropy(hooked(scans), labels).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad_sample, torch.stack(brute[name]), atol=1e-10), name
    # autograd's batch gradients: skipped by our Conv2d under DP, computed by nn.Conv2d
    skipped = {name for name, p in model.named_parameters() if p.grad is None}
    expected = {f"{i}.{name}" for i in (0, 2) for name, _ in model[i].named_parameters()}
    assert skipped == (expected if conv_class == "medsilo" else set()), skipped
    hooked._close()


@pytest.mark.parametrize("task", ["images", "vitals", "notes", "tabular"])
def test_default_models_step_under_ghost_clipping_as_under_hooks(task):
    """Ghost clipping's second backward reads p.grad, which models.layers.Linear / Conv2d and
    RecurrentLayer leave unset under hooks mode; keep_batch_gradients (client/training.py's
    make_private, mode ghost) makes them fill it. Without noise and clipping, both modes take
    the plain gradient step."""
    cfg = compose([f"task={task}"])
    spec = get_task(task).input_spec(cfg["task"])
    inputs = _random_inputs(task, spec)
    torch.manual_seed(1)
    batch, labels = inputs(4), torch.arange(4) % 2
    loader = DataLoader(TensorDataset(*inputs(8), torch.arange(8) % 2), batch_size=4)
    after = {}
    for mode in ("ghost", "hooks"):
        torch.manual_seed(0)
        model = build_model(cfg["model"], spec)
        if mode == "ghost":
            keep_batch_gradients(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=1e6, wrap_model=False, grad_sample_mode=mode,
            **({"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}))
        optimizer = private[1]
        criterion = private[2] if mode == "ghost" else nn.CrossEntropyLoss()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()  # no dropout: both modes see the same function
        optimizer.zero_grad()
        criterion(model(*batch), labels).backward()
        optimizer.step()
        after[mode] = [p.detach().clone() for p in model.parameters()]
        private[0].cleanup()
    for ghost, hooks in zip(after["ghost"], after["hooks"], strict=True):
        torch.testing.assert_close(ghost, hooks, rtol=1e-4, atol=1e-6)


def test_train_local_takes_ghost_clipping_steps_on_the_cnn():
    """make_private (mode ghost) keeps the batch gradients ghost clipping's second pass reads."""
    cfg = compose(["task=images"])
    spec = get_task("images").input_spec(cfg["task"])
    gen = torch.Generator().manual_seed(0)
    size = spec["image_size"]
    data = TensorDataset(torch.randn(16, spec["channels"], size, size, generator=gen),
                         torch.randint(0, 2, (16,), generator=gen))
    torch.manual_seed(0)
    model = build_model(cfg["model"], spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, data, LocalTrainingConfig(batch_size=8, lr=0.01), seed=0,
                         dp=DPConfig(1.0, 1.0, grad_sample_mode="ghost"))
    assert result["steps"] == 2
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
