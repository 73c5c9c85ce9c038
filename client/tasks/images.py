"""Images: classification of 2D scans from MedMNIST-style ``.npz`` files.

Format (as MedMNIST v2 ships it): keys ``train_images, train_labels, val_images, val_labels,
test_images, test_labels``; images uint8 ``N×H×W`` (grayscale) or ``N×H×W×C``; labels ``(N,)``
or ``(N, 1)``. The synthetic generator writes exactly this format.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import TensorDataset

from client.tasks.base import DataError, SiteData, SiteProfile, Task
from client.tasks.registry import register_task

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def _npz_path(folder: Path, task_cfg: Mapping[str, Any]) -> Path:
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist or is not a directory")
    path = folder / str(task_cfg.get("file", "scans.npz"))
    if not path.is_file():
        raise DataError(f"{path}: missing; expected a MedMNIST-style .npz with keys {NPZ_KEYS}")
    return path


def _read_split(
    arrays: Mapping[str, np.ndarray], path: Path, split: str, task_cfg: Mapping[str, Any]
) -> TensorDataset:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    spec = task_cfg["spec"]
    channels, size, num_classes = spec["channels"], spec["image_size"], spec["num_classes"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images has dtype {images.dtype}; expected uint8")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (size, size, channels):
        raise DataError(
            f"{path}: {split}_images has shape {arrays[f'{split}_images'].shape}; expected "
            f"N×{size}×{size}" + ("" if channels == 1 else f"×{channels}")
            + f" (task.spec.image_size={size}, task.spec.channels={channels})"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{path}: {split}_labels has shape {arrays[f'{split}_labels'].shape}; expected "
            f"({len(images)},) or ({len(images)}, 1)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels has dtype {labels.dtype}; expected integers")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(
            f"{path}: {split}_labels[{int(np.argmax(bad))}] = {labels[bad][0]} is outside the "
            f"declared classes 0..{num_classes - 1} (task.spec.num_classes={num_classes})"
        )
    # MedMNIST's usual normalisation: pixels to [-1, 1]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return TensorDataset(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


@register_task
class ImagesTask(Task):
    name = "images"

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        path = _npz_path(Path(folder), task_cfg)
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in NPZ_KEYS if k not in npz.files and not k.startswith("val")]
                if missing:
                    raise DataError(
                        f"{path}: missing keys {missing}; found {sorted(npz.files)}, "
                        f"expected {NPZ_KEYS} (val_* optional)"
                    )
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: not a readable .npz file ({err})") from err
        train = _read_split(arrays, path, "train", task_cfg)
        test = _read_split(arrays, path, "test", task_cfg)
        if len(train) == 0:
            raise DataError(f"site {site_id}: {path} has zero training examples")
        return SiteData(
            site_id=site_id,
            train=train,
            test=test,
            num_classes=int(task_cfg["spec"]["num_classes"]),
            source=str(path),
        )

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
            img = gaussian_filter(img, blur)
        img = gain * img + offset + rng.normal(0, noise, img.shape)
        pixels = np.clip(img * 255, 0, 255).astype(np.uint8)
        out[i] = pixels[..., None] if channels == 1 else np.repeat(pixels[..., None], channels, -1)
    return out
