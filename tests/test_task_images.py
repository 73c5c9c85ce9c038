"""Images task: MedMNIST-style npz and image folders, the synthetic generator, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from client.evaluation import evaluate
from client.tasks import DataError, get_task
from client.training import LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

TASK = get_task("images")
GENERATOR = get_generator("images")  # synthetic sites and partitions (simulation only)


@pytest.fixture
def cfg():
    return compose(["task.synthetic.train_size=60", "task.synthetic.test_size=30"])


def _write_npz(path, n_train=6, n_test=4, labels_2d=True, size=28, **extra):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", 2), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 2, n).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if labels_2d else labels
    arrays.update(extra)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("labels_2d", [True, False])
def test_medmnist_npz_round_trip(tmp_path, cfg, labels_2d):
    arrays = _write_npz(tmp_path / "site" / "scans.npz", labels_2d=labels_2d)
    data = TASK.load_site(tmp_path / "site", cfg["task"], "h1")
    x, y = data.train.tensors
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.tolist() == arrays["train_labels"].reshape(-1).tolist()
    assert len(data.test) == 4 and data.num_classes == 2


def test_rgb_images_load_channels_first(tmp_path, cfg):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "scans.npz", train_images=imgs, train_labels=np.arange(5) % 2,
             test_images=imgs[:2], test_labels=np.array([0, 1]))
    task_cfg = {**cfg["task"], "spec": {**cfg["task"]["spec"], "channels": 3}}
    x, _ = TASK.load_site(tmp_path, task_cfg, "h1").train.tensors
    assert x.shape == (5, 3, 28, 28)
    assert torch.allclose(x[0, 2], torch.from_numpy(imgs[0, :, :, 2]).float() / 127.5 - 1)


def test_image_folder_format(tmp_path, cfg):
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("normal", "pneumonia"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    data = TASK.load_site(tmp_path, cfg["task"], "h1")
    assert len(data.train) == 6 and len(data.test) == 4
    assert sorted(data.train.tensors[1].tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("test_labels"), "missing keys \\['test_labels'\\]"),
        (lambda d: d.__setitem__("train_labels", np.array([0, 1, 5, 0, 1, 0])),
         "outside the declared classes"),
        (lambda d: d.__setitem__("train_images", np.zeros((6, 32, 32), np.uint8)),
         "expected N×28×28"),
        (lambda d: d.__setitem__("train_labels", np.zeros(5, np.uint8)), "expected \\(6,\\)"),
        (lambda d: d.__setitem__("train_images", np.zeros((6, 28, 28), np.float32)),
         "expected uint8"),
    ],
)
def test_bad_npz_names_the_file_and_what_was_expected(tmp_path, cfg, mutate, message):
    arrays = _write_npz(tmp_path / "x.npz")
    mutate(arrays)
    np.savez(tmp_path / "scans.npz", **arrays)
    with pytest.raises(DataError, match=message) as err:
        TASK.load_site(tmp_path, cfg["task"], "h1")
    assert "scans.npz" in str(err.value)


def test_missing_folder_truncated_file_and_empty_training_split(tmp_path, cfg):
    with pytest.raises(DataError, match="does not exist"):
        TASK.load_site(tmp_path / "nope", cfg["task"], "h1")
    _write_npz(tmp_path / "scans.npz")
    blob = (tmp_path / "scans.npz").read_bytes()
    (tmp_path / "scans.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="not a readable .npz"):
        TASK.load_site(tmp_path, cfg["task"], "h1")
    _write_npz(tmp_path / "scans.npz", n_train=0)
    with pytest.raises(DataError, match="site h1: .* zero training examples"):
        TASK.load_site(tmp_path, cfg["task"], "h1")


def test_synthetic_sites_are_deterministic_and_different(tmp_path, cfg):
    profiles = GENERATOR.site_profiles(cfg["task"], 3, seed=0)
    for i, profile in enumerate(profiles):
        GENERATOR.generate_site(tmp_path / f"a{i}", cfg["task"], profile, seed=0)
    GENERATOR.generate_site(tmp_path / "again", cfg["task"], profiles[0], seed=0)
    first = TASK.load_site(tmp_path / "a0", cfg["task"], "a0")
    again = TASK.load_site(tmp_path / "again", cfg["task"], "again")
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    sizes = {len(TASK.load_site(tmp_path / f"a{i}", cfg["task"], "s").train) for i in range(3)}
    prevalences = {round(float(p.class_weights[1]), 3) for p in profiles}
    assert len(sizes) == 3 and len(prevalences) == 3


def test_synthetic_scans_are_learnable_and_shuffled_labels_are_not(tmp_path, cfg):
    task_cfg = {**cfg["task"], "synthetic": {**cfg["task"]["synthetic"], "train_size": 500,
                                             "test_size": 300}}
    profile = GENERATOR.site_profiles(task_cfg, 1, seed=0)[0]
    GENERATOR.generate_site(tmp_path, task_cfg, profile, seed=0)
    data = TASK.load_site(tmp_path, task_cfg, "h1")
    x, y = data.train.tensors
    results = {}
    for name, labels in (("real", y), ("shuffled", y[torch.randperm(len(y),
                                                        generator=torch.Generator().manual_seed(0))])):
        torch.manual_seed(0)
        model = build_model(cfg["model"], task_cfg["spec"])
        train_local(model, torch.utils.data.TensorDataset(x, labels),
                    LocalTrainingConfig(epochs=8, batch_size=32, lr=0.02, momentum=0.9), seed=0)
        results[name] = evaluate(model, data.test, 2)["auroc"]
    assert results["real"] > 0.75, results
    assert results["shuffled"] < 0.65, results
