"""Model options chosen for DP-SGD and the per-model DP training defaults (conf/training/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import DPConfig, LocalTrainingConfig, train_local
from models import build_model
from privacy.accounting import noise_multiplier_for
from server.settings import compose

TABULAR_SPEC = {"num_features": 35, "num_classes": 2}


def _records(n: int, seed: int, positive_share: float = 0.25) -> TensorDataset:
    """Encoded records whose label follows a logistic model of a few features, with the
    minority class at ``positive_share`` (like a hospital's disease prevalence)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TABULAR_SPEC["num_features"], generator=generator)
    weights = torch.zeros(TABULAR_SPEC["num_features"])
    weights[:5] = torch.tensor([1.5, -1.2, 1.0, 0.8, -0.8])
    logits = x @ weights
    threshold = torch.quantile(logits, 1 - positive_share)
    noisy = logits + 0.5 * torch.randn(n, generator=generator)
    return TensorDataset(x, (noisy > threshold).long())


def test_mlp_activation_defaults_to_relu_and_tanh_bounds_the_hidden_units():
    plain = build_model({"name": "mlp", "hidden": [16]}, TABULAR_SPEC)
    bounded = build_model({"name": "mlp", "hidden": [16], "activation": "tanh"}, TABULAR_SPEC)
    assert [type(m) for m in plain.body] == [nn.Linear, nn.ReLU]
    assert [type(m) for m in bounded.body] == [nn.Linear, nn.Tanh]
    hidden = bounded.body(100 * torch.randn(64, TABULAR_SPEC["num_features"]))
    assert hidden.abs().max() <= 1.0
    with pytest.raises(ValueError, match="activation must be one of"):
        build_model({"name": "mlp", "hidden": [16], "activation": "gelu"}, TABULAR_SPEC)


def test_cnn_activation_is_configurable_and_checked():
    spec = {"channels": 1, "image_size": 28, "num_classes": 2}
    cnn = build_model({"name": "cnn", "activation": "tanh"}, spec)
    kinds = {type(m) for m in cnn.features.modules()}
    assert nn.Tanh in kinds and nn.ReLU not in kinds
    with pytest.raises(ValueError, match="activation must be one of"):
        build_model({"name": "cnn", "activation": "gelu"}, spec)


def test_tanh_mlp_trains_under_dp_sgd_through_empty_poisson_batches(one_thread):
    model = build_model({"name": "mlp", "hidden": [16], "activation": "tanh"}, TABULAR_SPEC)
    keys, before = list(model.state_dict()), [p.detach().clone() for p in model.parameters()]
    batch_sizes: list[int] = []
    # 4 records at batch size 1: sample rate 1/4, so some of the 8 Poisson batches are empty
    # (seeded); DP-SGD must still noise and count them.
    stats = train_local(
        model, _records(4, seed=0), LocalTrainingConfig(epochs=2, batch_size=1, lr=0.1),
        seed=3, dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        step_hook=lambda _model, _q, size: batch_sizes.append(size),
    )
    assert stats["steps"] == 8 and len(batch_sizes) == 8
    assert 0 in batch_sizes
    assert list(model.state_dict()) == keys  # unwrapped: the same keys the server aggregates
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("model", ["mlp", "logreg"])
def test_dp_defaults_train_a_tabular_model_that_predicts_both_classes(model, one_thread):
    """With privacy=dp at eps 8, the shipped defaults (conf/training/<model>_dp.yaml) give a
    model that still tells patients apart at the argmax: the old defaults (Adam, lr 0.003,
    batch 32) predicted "no disease" for everyone."""
    cfg = compose(["task=tabular", f"model={model}", "privacy=dp"])
    train, test = _records(300, seed=1), _records(400, seed=2)
    local = LocalTrainingConfig(epochs=cfg["local_epochs"], batch_size=cfg["batch_size"],
                                lr=cfg["lr"], momentum=cfg["momentum"],
                                optimizer=cfg["optimizer"])
    rounds, steps_per_round = 5, 3 * cfg["local_epochs"]  # ceil(300 / 128) batches per epoch
    sigma = noise_multiplier_for(cfg["privacy"]["target_epsilon"], 1e-5, 1 / 3,
                                 rounds * steps_per_round, accountant="rdp")
    net = build_model(cfg["model"], TABULAR_SPEC)
    for round_ in range(rounds):
        train_local(net, train, local, seed=round_,
                    dp=DPConfig(noise_multiplier=sigma,
                                max_grad_norm=cfg["privacy"]["max_grad_norm"]))
    net.eval()
    with torch.no_grad():
        predicted = net(test.tensors[0]).argmax(dim=1)
    labels = test.tensors[1]
    recall = [float((predicted[labels == k] == k).float().mean()) for k in (0, 1)]
    assert sum(recall) / 2 > 0.7, recall


@pytest.mark.parametrize("overrides, expected", [
    (["task=tabular", "privacy=dp"],
     {"optimizer": "sgd", "lr": 0.3, "batch_size": 128, "model.hidden": [16],
      "model.activation": "tanh", "model.dropout": 0.0}),
    (["task=tabular"],  # without DP the plain defaults stand
     {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "model.hidden": [32, 16],
      "model.activation": "relu"}),
    (["task=tabular", "model=logreg", "privacy=dp"],
     {"optimizer": "sgd", "lr": 0.3, "batch_size": 128, "model.hidden": []}),
    (["task=vitals", "privacy=dp"],
     {"optimizer": "sgd", "lr": 1.0, "batch_size": 256, "local_epochs": 1,
      "privacy.max_grad_norm": 3.0, "class_balance": "auto"}),
    (["task=vitals", "model=gru", "privacy=dp"],
     {"optimizer": "sgd", "lr": 1.0, "batch_size": 256, "local_epochs": 1,
      "privacy.max_grad_norm": 3.0, "class_balance": "auto"}),
    # the command line still wins over the per-model DP defaults
    (["task=vitals", "privacy=dp", "privacy.max_grad_norm=1", "lr=0.1"],
     {"lr": 0.1, "privacy.max_grad_norm": 1.0}),
    (["task=tabular", "privacy=dp", "model.activation=relu", "batch_size=64"],
     {"model.activation": "relu", "batch_size": 64}),
])
def test_dp_training_defaults_per_model(overrides, expected):
    cfg = compose(overrides)
    for dotted, value in expected.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        assert (list(node) if isinstance(value, list) else node) == value, dotted
