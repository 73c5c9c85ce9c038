"""Images: classification of 2D scans.

Two site formats (``task.format``: ``npz``, ``folder`` or ``auto`` = npz if the file exists):

- MedMNIST-style ``.npz`` (as MedMNIST v2 ships it): keys ``train_images, train_labels,
  val_images, val_labels, test_images, test_labels``; images uint8 ``N×H×W`` (grayscale) or
  ``N×H×W×C``; labels ``(N,)`` or ``(N, 1)``. ``val_*`` is optional. The synthetic generator
  (``simulations/synthetic/images.py``) writes exactly this format.
- an image folder: ``train/<class>/*.png|jpg``, ``test/<class>/*.png|jpg``; classes are the
  sub-folder names in sorted order, or ``task.class_names`` when given.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.tasks.base import DataError, SiteData, Task
from client.tasks.registry import register_task

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive (an empty one: 2nd)
NPZ_EXPECTED = "a MedMNIST-style .npz archive (np.savez) of uint8 images and integer labels"


def _npz_path(folder: Path, task_cfg: Mapping[str, Any]) -> Path:
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise DataError(f"site folder {folder} does not exist or is not a directory")
    path = folder / str(task_cfg.get("file", "scans.npz"))
    if path.is_dir():
        raise DataError(f"{path}: a directory; expected {NPZ_EXPECTED} with keys {NPZ_KEYS}")
    if not path.is_file():
        raise DataError(f"{path}: missing; expected a MedMNIST-style .npz with keys {NPZ_KEYS}")
    return path


def _format(folder: Path, task_cfg: Mapping[str, Any]) -> str:
    fmt = str(task_cfg.get("format", "auto"))
    if fmt not in ("auto", "npz", "folder"):
        raise DataError(f"task.format must be one of auto, npz, folder; got {fmt!r}")
    if fmt == "auto":
        npz = folder if folder.is_file() else folder / str(task_cfg.get("file", "scans.npz"))
        return "npz" if npz.is_file() or not (folder / "train").is_dir() else "folder"
    return fmt


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a MedMNIST-style file; a clear error for a missing key or broken file."""
    try:
        with open(path, "rb") as handle:
            signature = handle.read(4)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); expected "
                        f"{NPZ_EXPECTED}") from err
    # np.load falls back to unpickling whatever is not a zip or .npy file, and its message then
    # advises allow_pickle=True: never advice to give about a file from elsewhere.
    if not signature:
        raise DataError(f"{path}: an empty file (0 bytes); expected {NPZ_EXPECTED}")
    if signature not in ZIP_SIGNATURES:
        kind = "a single .npy array" if signature.startswith(b"\x93NUM") else "not a zip archive"
        raise DataError(f"{path}: {kind}; expected {NPZ_EXPECTED} with keys {NPZ_KEYS}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            required = [k for k in NPZ_KEYS if not k.startswith("val")]
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing keys {missing}; found {sorted(npz.files)}, "
                    f"expected {NPZ_KEYS} (val_* optional)"
                )
            return {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError,
            RuntimeError, NotImplementedError) as err:
        # a truncated or corrupted archive, a member that is not an .npy array, object arrays
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); "
                        f"expected {NPZ_EXPECTED}") from err


def read_image_folder(folder: Path, task_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``train/<class>/*.png`` + ``test/<class>/*.png`` -> the same arrays as an npz file."""
    from PIL import Image, UnidentifiedImageError

    spec = task_cfg["spec"]
    mode = "L" if int(spec["channels"]) == 1 else "RGB"
    names = task_cfg.get("class_names")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        split_dir = folder / split
        if split_dir.exists() and not split_dir.is_dir():
            raise DataError(f"{split_dir}: a file; expected a folder {split}/<class>/*.png|jpg")
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing; expected {split}/<class>/*.png|jpg")
        # an image outside any class folder has no label: an error, not silently left out
        loose = sorted(p.name for p in split_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if loose:
            raise DataError(f"{split_dir}: images {loose[:3]} are not inside a class folder; "
                            f"expected {split}/<class>/*.png|jpg")
        classes = list(names) if names else sorted(p.name for p in split_dir.iterdir()
                                                  if p.is_dir())
        images, labels = [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise DataError(f"{class_dir}: class {class_dir.name!r} is not one of the "
                                f"declared classes {classes} (task.class_names)")
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(file) as img:
                        images.append(np.asarray(img.convert(mode), dtype=np.uint8))
                except (UnidentifiedImageError, OSError) as err:
                    raise DataError(f"{file}: not a readable image ({err})") from err
                labels.append(classes.index(class_dir.name))
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DataError(f"{split_dir}: images have different sizes {sorted(shapes)}; "
                            "expected one size (task.spec.image_size)")
        arrays[f"{split}_images"] = (np.stack(images) if images
                                     else np.zeros((0, 1, 1), dtype=np.uint8))
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    return arrays


def read_site_arrays(folder: Path, task_cfg: Mapping[str, Any]) -> tuple[dict, Path]:
    folder = Path(folder)
    if _format(folder, task_cfg) == "folder":
        return read_image_folder(folder, task_cfg), folder
    path = _npz_path(folder, task_cfg)
    return read_npz(path), path


def checked_split(
    arrays: Mapping[str, np.ndarray], path: Path, split: str, task_cfg: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (N×H×W×C uint8) and labels (N,), checked against ``task.spec``."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim >= 1 and len(images) == 0 and images.ndim != 4:
        images = np.zeros((0, task_cfg["spec"]["image_size"], task_cfg["spec"]["image_size"],
                           task_cfg["spec"]["channels"]), dtype=np.uint8)
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
    return images, labels


def _read_split(
    arrays: Mapping[str, np.ndarray], path: Path, split: str, task_cfg: Mapping[str, Any]
) -> TensorDataset:
    images, labels = checked_split(arrays, path, split, task_cfg)
    # MedMNIST's usual normalisation: pixels to [-1, 1]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return TensorDataset(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


@register_task
class ImagesTask(Task):
    name = "images"

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        arrays, path = read_site_arrays(folder, task_cfg)
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
