"""Black-box canary records written into the auditing site's folder in the task's own format.

The canaries of the black-box audit are records of the site (Steinke, Nasr, Jagielski 2023, §7:
mislabeled, out-of-distribution examples), so they must reach DP-SGD through the same files and
loader as the site's real records: the loader decides their encoding (a tabular site
standardises with its own training statistics, canaries included), the planned sample rate counts
them, and nothing in the training path knows they are canaries.

One writer per task (a registry, like the tasks themselves). A writer produces two folders:

- ``site``: the site's records with the included canaries added to its training split;
- ``probe``: the same training split, with ALL m canaries as its test split, so that loading it
  gives every canary (included or not) encoded exactly as the site encoded its training data.

Tasks without a writer (vitals, notes; image folders of PNGs) raise :class:`CanaryUnsupported`;
the audit then reports the black-box variant as skipped, never as passed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

CanaryWriter = Callable[[Path, Path, Path, Mapping[str, Any], np.ndarray, int], None]
_WRITERS: dict[str, CanaryWriter] = {}


class CanaryUnsupported(ValueError):
    """This task or site format has no black-box canary writer."""


def register_canary_writer(task: str) -> Callable[[CanaryWriter], CanaryWriter]:
    def register(writer: CanaryWriter) -> CanaryWriter:
        _WRITERS[task] = writer
        return writer

    return register


def write_canary_site(task_cfg: Mapping[str, Any], source: Path, site: Path, probe: Path,
                      included: np.ndarray, seed: int) -> None:
    """Write ``site`` (source + included canaries in train) and ``probe`` (test = all canaries).

    ``included`` has one bool per canary (m = its length); ``seed`` draws the canaries.
    """
    writer = _WRITERS.get(str(task_cfg["name"]))
    if writer is None:
        raise CanaryUnsupported(f"no black-box canary writer for task {task_cfg['name']!r} "
                                f"(available: {sorted(_WRITERS)})")
    included = np.asarray(included, dtype=bool)
    if included.ndim != 1 or len(included) < 2:
        raise ValueError(f"included must be 1-D with >= 2 canaries, got shape {included.shape}")
    site.mkdir(parents=True, exist_ok=True)
    probe.mkdir(parents=True, exist_ok=True)
    writer(Path(source), site, probe, task_cfg, included, seed)


@register_canary_writer("images")
def _image_canaries(source: Path, site: Path, probe: Path, task_cfg: Mapping[str, Any],
                    included: np.ndarray, seed: int) -> None:
    """Uniform-noise scans with uniform random labels, appended to the npz's train split."""
    from client.tasks.images import _format, read_npz

    if _format(source, task_cfg) != "npz":
        raise CanaryUnsupported(f"{source}: black-box canaries are written into MedMNIST-style "
                                "npz sites only, not image folders")
    name = str(task_cfg.get("file", "scans.npz"))
    arrays = read_npz(source / name)
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    rng = np.random.default_rng([seed, 17])
    m = len(included)
    images = rng.integers(0, 256, (m, *train_images.shape[1:]), dtype=np.uint8)
    labels = rng.integers(0, int(task_cfg["spec"]["num_classes"]), m)
    labels = labels.astype(train_labels.dtype).reshape(m, *train_labels.shape[1:])
    augmented = {**arrays,
                 "train_images": np.concatenate([train_images, images[included]]),
                 "train_labels": np.concatenate([train_labels, labels[included]])}
    np.savez(site / name, **augmented)
    np.savez(probe / name, **{**augmented, "test_images": images, "test_labels": labels})


@register_canary_writer("tabular")
def _tabular_canaries(source: Path, site: Path, probe: Path, task_cfg: Mapping[str, Any],
                      included: np.ndarray, seed: int) -> None:
    """Rows whose every column is drawn independently from the site's own training rows (each
    value plausible, the combination out of distribution) with a uniform random label; written
    as ``train.csv`` + ``test.csv`` so that no canary can fall into the test split."""
    from client.tasks.tabular import SPLIT_FILES, _row_is_test, read_table, site_files

    files = site_files(source, task_cfg)
    tables = [read_table(p, task_cfg) for p in files]
    columns = tables[0].columns
    if len(tables) == 2:
        train, test = tables[0].rows, tables[1].rows
    else:
        fraction = float(task_cfg.get("test_fraction", 0.25))
        train = [r for r in tables[0].rows if not _row_is_test(r, fraction)]
        test = [r for r in tables[0].rows if _row_is_test(r, fraction)]
    label = str(task_cfg["label"])
    if label not in columns or not train:
        raise CanaryUnsupported(f"{source}: no training rows or no label column {label!r}")
    rng = np.random.default_rng([seed, 19])
    label_at = columns.index(label)
    classes = task_cfg.get("label_classes")
    threshold = task_cfg.get("label_threshold")
    values = ([str(c) for c in classes] if classes else
              [f"{float(threshold):g}", f"{float(threshold) + 1:g}"])
    canaries = []
    for _ in range(len(included)):
        row = [train[int(rng.integers(len(train)))][j] for j in range(len(columns))]
        row[label_at] = values[int(rng.integers(len(values)))]
        canaries.append(row)
    kept = [row for row, inside in zip(canaries, included, strict=True) if inside]
    header = str(task_cfg.get("header", "first_line")) != "none"
    _write_csv(site / SPLIT_FILES[0], task_cfg, columns, train + kept, header)
    _write_csv(site / SPLIT_FILES[1], task_cfg, columns, test, header)
    _write_csv(probe / SPLIT_FILES[0], task_cfg, columns, train + kept, header)
    _write_csv(probe / SPLIT_FILES[1], task_cfg, columns, canaries, header)


def _write_csv(path: Path, task_cfg: Mapping[str, Any], columns: list[str],
               rows: list[list[str]], header: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=str(task_cfg.get("delimiter", ",")),
                            lineterminator="\n")
        if header:
            writer.writerow(columns)
        writer.writerows(rows)
