"""Images: synthetic chest-scan-like hospitals and pooled MedMNIST-style files dealt out to
sites, both written as the ``.npz`` the images loader (``client/tasks/images.py``) reads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.tasks import DataError
from client.tasks.images import checked_split, read_site_arrays
from simulations.synthetic.base import PooledRecords, SiteGenerator, SiteProfile
from simulations.synthetic.registry import register_generator


@register_generator
class ImagesGenerator(SiteGenerator):
    name = "images"

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        if site_column:
            raise DataError(f"{path}: images have no columns; data.partition=column needs a "
                            "tabular or notes task")
        arrays, source = read_site_arrays(path, task_cfg)
        # the same checks as a site's file: a pooled file's bad label must not reach a partition
        labels = [checked_split(arrays, source, s, task_cfg)[1] for s in ("train", "test")]
        return PooledRecords(
            labels=np.concatenate(labels).astype(np.int64),
            is_test=np.concatenate([np.zeros(len(labels[0]), bool), np.ones(len(labels[1]), bool)]),
        )

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        arrays, _ = read_site_arrays(path, task_cfg)
        n_train = len(arrays["train_images"])
        records = np.asarray(records)
        train_ids, test_ids = records[records < n_train], records[records >= n_train] - n_train
        out = {
            "train_images": arrays["train_images"][train_ids],
            "train_labels": _labels_1d(arrays["train_labels"])[train_ids],
            "test_images": arrays["test_images"][test_ids],
            "test_labels": _labels_1d(arrays["test_labels"])[test_ids],
        }
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / str(task_cfg.get("file", "scans.npz")), **out)

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        rng = np.random.default_rng([seed, profile.index, 1])
        splits = {
            "train": profile.num_train,
            "val": max(4, profile.num_train // 8),
            "test": profile.num_test,
        }
        arrays = {}
        for split, n in splits.items():
            labels = rng.choice(len(profile.class_weights), size=n, p=profile.class_weights)
            arrays[f"{split}_images"] = synthetic_scans(labels, task_cfg, profile, rng)
            arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]  # MedMNIST uses (N, 1)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / str(task_cfg.get("file", "scans.npz")), **arrays)


def _labels_1d(labels: np.ndarray) -> np.ndarray:
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


def synthetic_scans(
    labels: np.ndarray, task_cfg: Mapping[str, Any], profile: SiteProfile, rng: np.random.Generator
) -> np.ndarray:
    """Chest-scan-like images: two dark lung fields on soft tissue; a finding is an opacity.

    Class k places k opacities (larger for larger k) inside the lung fields, with varying
    contrast (some faint), so the task is learnable but not trivial. The site shift mimics a
    scanner: intensity gain/offset, blur and noise level differ per hospital.
    """
    size, channels = int(task_cfg["spec"]["image_size"]), int(task_cfg["spec"]["channels"])
    shift = profile.shift
    gain = 0.75 + 0.5 * shift["u"]
    offset = -0.08 + 0.16 * shift["v"]
    blur = 1.2 * shift["w"] * size / 28
    noise = 0.05 + 0.07 * shift["u"] * shift["v"]

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((len(labels), size, size, channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        img = np.full((size, size), 0.62, dtype=np.float32)
        cy = 0.5 + rng.normal(0, 0.03)
        lungs = []
        for cx in (0.3 + rng.normal(0, 0.02), 0.7 + rng.normal(0, 0.02)):
            ry, rx = 0.3 + rng.normal(0, 0.02), 0.15 + rng.normal(0, 0.015)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            img[inside] = 0.25
            lungs.append((cy, cx, ry, rx))
        # vessels: faint bright streaks in every image (a confounder for the opacity detector)
        for _ in range(3):
            ly, lx, ry, rx = lungs[rng.integers(2)]
            py, px = ly + rng.uniform(-0.6, 0.6) * ry, lx + rng.uniform(-0.6, 0.6) * rx
            img += 0.1 * np.exp(-(((yy - py) / 0.015) ** 2 + ((xx - px) / 0.06) ** 2))
        for _ in range(int(label)):
            ly, lx, ry, rx = lungs[rng.integers(2)]
            py, px = ly + rng.uniform(-0.5, 0.5) * ry, lx + rng.uniform(-0.5, 0.5) * rx
            radius = rng.uniform(0.06, 0.1) * (1 + 0.3 * (int(label) - 1))
            contrast = rng.uniform(0.12, 0.5)
            img += contrast * np.exp(-(((yy - py) ** 2 + (xx - px) ** 2) / (2 * radius**2)))
        if blur > 0.05:
            from scipy.ndimage import gaussian_filter  # only when images are written

            img = gaussian_filter(img, blur)
        img = gain * img + offset + rng.normal(0, noise, img.shape)
        pixels = np.clip(img * 255, 0, 255).astype(np.uint8)
        out[i] = pixels[..., None] if channels == 1 else np.repeat(pixels[..., None], channels, -1)
    return out
