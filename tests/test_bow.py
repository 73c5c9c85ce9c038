"""The hashed n-gram bag (model=bow): what a site relies on when training it, with or without DP."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from client.evaluation import evaluate
from client.tasks import get_task
from client.tasks.notes import encode_notes
from client.training import DPConfig, LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

TASK = get_task("notes")
GENERATOR = get_generator("notes")
SPEC = {"vocab_buckets": 512, "max_len": 16, "num_classes": 3}

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off",
                                        "ignore:Full backward hook")


def _bow(**overrides):
    cfg = compose(["task=notes", "model=bow"])
    return build_model({**cfg["model"], **overrides}, SPEC)


def test_builds_from_config_for_the_notes_task():
    cfg = compose(["task=notes", "model=bow"])
    model = build_model(cfg["model"], TASK.input_spec(cfg["task"]))
    tokens, mask = encode_notes(["no evidence of pneumonia", "rll pna on cxr", "chf"],
                                vocab_buckets=8192, max_len=128)
    assert model(tokens, mask).shape == (3, 2)
    assert list(model.state_dict()) == ["token_embedding.weight", "head.weight"]
    for pooling in ("mean", "sqrt"):
        out = _bow(pooling=pooling)(*encode_notes(["a b"], 512, 16))
        assert out.shape == (1, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="pooling must be one of"):
        _bow(pooling="max")


@pytest.mark.parametrize("pooling", ["sqrt", "mean"])
def test_a_note_is_a_bag_of_its_ids(pooling):
    """Padding is tested for every notes model in tests/test_task_notes.py; here what is the
    bag's own: word order does not matter, different notes differ."""
    torch.manual_seed(0)
    model = _bow(pooling=pooling, embedding_std=1.0).eval()
    tokens = torch.randint(1, 512, (4, 16, 2))
    tokens[:, :, 1][torch.rand(4, 16) < 0.3] = 0  # words that start no bigram
    mask = torch.zeros(4, 16, dtype=torch.bool)
    for i, n in enumerate((16, 9, 3, 1)):
        mask[i, :n] = True
    order = torch.randperm(9)
    assert torch.allclose(model(tokens[1:2, order], mask[1:2, order]),
                          model(tokens[1:2, :9], mask[1:2, :9]), atol=1e-5)
    assert not torch.allclose(model(tokens, mask)[0], model(tokens, mask)[1])


def test_under_dp_the_default_table_is_smaller_and_ids_fold_onto_it():
    cfg = compose(["task=notes", "privacy=dp"])
    assert cfg["model"]["name"] == "bow"
    torch.manual_seed(0)
    model = build_model({**cfg["model"], "embedding_std": 1.0}, TASK.input_spec(cfg["task"]))
    assert model.token_embedding.weight.shape == (2048, 2)  # one entry per class
    tokens = torch.tensor([[[5, 9], [300, 0], [12, 0]]])  # ids < 2048; 0 = no bigram
    mask = torch.ones(1, 3, dtype=torch.bool)
    shifted = torch.where(tokens > 0, tokens + 2047, 0)  # ids 2047 apart share a row
    assert torch.allclose(model(tokens, mask), model(shifted, mask), atol=1e-6)
    assert not torch.allclose(model(tokens, mask), model(torch.where(tokens > 0, tokens + 1, 0),
                                                         mask))
    with pytest.raises(ValueError, match="buckets must be in"):
        build_model({**cfg["model"], "buckets": 9000}, TASK.input_spec(cfg["task"]))


def test_dp_clips_each_notes_true_gradient_even_with_repeated_words():
    """Opacus's per-note gradients equal each note's own autograd gradient (a word repeated in a
    note counts each time: nn.EmbeddingBag's grad sampler in Opacus 1.6 would count it once)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = _bow(embedding_std=1.0)
    tokens, mask = encode_notes(["fever fever fever cough", "no fever", "cough cough"], 512, 16)
    labels = torch.tensor([1, 0, 2])
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(wrapped(tokens, mask), labels, reduction="sum").backward()
    for i in range(3):
        single = _bow()
        single.load_state_dict(model.state_dict())
        torch.nn.functional.cross_entropy(single(tokens[i:i + 1], mask[i:i + 1]),
                                          labels[i:i + 1]).backward()
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-6), name
    wrapped._close()


def test_dp_sgd_through_the_sites_training_loop_counts_and_survives_empty_batches(one_thread):
    torch.manual_seed(0)
    model = _bow()
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, mask = encode_notes(["cough and fever", "no pneumonia", "chf", "rll pna"], 512, 16)
    batches = []
    stats = train_local(model, TensorDataset(tokens, mask, torch.tensor([1, 0, 2, 1])),
                        LocalTrainingConfig(epochs=10, batch_size=1, lr=0.5, optimizer="sgd"),
                        seed=3, dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0),
                        step_hook=lambda m, q, n: batches.append((q, n)))
    # Poisson sampling at q = 1/4: 40 steps, some of them on no note at all, all run
    assert stats["steps"] == 40 and len(batches) == 40 and {q for q, _ in batches} == {0.25}
    assert any(n == 0 for _, n in batches) and any(n > 0 for _, n in batches)
    after = model.state_dict()
    assert list(after) == keys  # unwrapped: the keys the server expects
    assert all(torch.isfinite(v).all() and not torch.equal(v, before[k])
               for k, v in after.items())


def _site(tmp_path, seed, train_size, test_size):
    cfg = compose(["task=notes", "model=bow", f"task.synthetic.train_size={train_size}",
                   f"task.synthetic.test_size={test_size}", "task.synthetic.label_alpha=50"])
    profile = GENERATOR.site_profiles(cfg["task"], 1, seed=seed)[0]
    GENERATOR.generate_site(tmp_path, cfg["task"], profile, seed=seed)
    return cfg, TASK.load_site(tmp_path, cfg["task"], "h1")


def test_learns_the_synthetic_notes_of_one_small_site_and_not_shuffled_labels(tmp_path,
                                                                             one_thread):
    cfg, site = _site(tmp_path, seed=2, train_size=300, test_size=200)
    spec = TASK.input_spec(cfg["task"])
    results = {}
    gen = torch.Generator().manual_seed(0)
    tokens, mask, labels = site.train.tensors
    for name, y in (("real", labels), ("shuffled", labels[torch.randperm(len(labels),
                                                                         generator=gen)])):
        torch.manual_seed(0)
        model = build_model(cfg["model"], spec)
        train_local(model, TensorDataset(tokens, mask, y),
                    LocalTrainingConfig(epochs=10, batch_size=32, lr=0.01, optimizer="adam"),
                    seed=0)
        results[name] = evaluate(model, site.test, 2)
    real, shuffled = results["real"], results["shuffled"]
    assert real["auroc"] > 0.8 and real["balanced_accuracy"] > 0.72, real
    assert shuffled["auroc"] < 0.62, shuffled  # nothing to learn: no better than chance
