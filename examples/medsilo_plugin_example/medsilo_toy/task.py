"""``toy_csv``: one site's ``train.csv`` and ``test.csv``, a header ``x1,...,xK,label`` (K is
``task.spec.num_features``; other columns are ignored), one patient per line.

What a hospital runs: read its files into tensors, every bad value a ``DataError`` naming the
file, the line and the column. The generator writing such folders for simulations lives apart,
in ``medsilo_toy/synthetic.py``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.tasks import DataError, SiteData, Task, register_task
from client.tasks.base import text_lines

SPLITS = ("train.csv", "test.csv")


def feature_columns(task_cfg: Mapping[str, Any]) -> list[str]:
    return [f"x{i + 1}" for i in range(int(task_cfg["spec"]["num_features"]))]


def read_split(path: Path, task_cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, one row per patient) and labels (int64) of one CSV file."""
    columns = [*feature_columns(task_cfg), "label"]
    expected = f"a CSV table with a header holding {columns}"
    rows = csv.reader(text_lines(path, expected))
    header = next(rows, None)
    if header is None:
        raise DataError(f"{path}: empty; expected {expected}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: no column(s) {missing}; expected {expected}")
    where = [header.index(c) for c in columns]
    num_classes = int(task_cfg["spec"]["num_classes"])
    features, labels = [], []
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        values = []
        for name, index in zip(columns, where, strict=True):
            text = row[index] if index < len(row) else ""
            try:
                values.append(float(text))
            except ValueError:
                raise DataError(f"{path}, line {line}, column {name}: {text!r} is not a "
                                "number") from None
        label = values.pop()
        if label != int(label) or not 0 <= label < num_classes:
            raise DataError(f"{path}, line {line}, column label: {label:g}; expected a class "
                            f"in 0..{num_classes - 1} (task.spec.num_classes={num_classes})")
        features.append(values)
        labels.append(int(label))
    if not labels:
        raise DataError(f"{path}: no patients; expected {expected} and at least one row")
    return (np.asarray(features, dtype=np.float32).reshape(len(labels), -1),
            np.asarray(labels, dtype=np.int64))


@register_task
class ToyCsvTask(Task):
    name = "toy_csv"

    def load_site(self, folder: Path, task_cfg: Mapping[str, Any], site_id: str) -> SiteData:
        folder = Path(folder)
        train_x, train_y = read_split(folder / SPLITS[0], task_cfg)
        test_x, test_y = read_split(folder / SPLITS[1], task_cfg)
        return SiteData(
            site_id=site_id,
            train=TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
            test=TensorDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)),
            num_classes=int(task_cfg["spec"]["num_classes"]),
            source=str(folder),
        )
