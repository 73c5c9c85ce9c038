"""Simulation only (``simulation.plugins``): synthetic ``toy_csv`` hospitals, and a pooled
``toy_csv`` folder dealt out to sites, written in exactly the format ``medsilo_toy/task.py``
reads. A hospital never imports this module.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsilo_toy.task import SPLITS, feature_columns, read_split
from simulations.synthetic import PooledRecords, SiteGenerator, SiteProfile, register_generator


def _write(path: Path, columns: Sequence[str], features: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "label"])
        for row, label in zip(features, labels, strict=True):
            writer.writerow([f"{v:.5f}" for v in row] + [int(label)])


@register_generator
class ToyCsvGenerator(SiteGenerator):
    name = "toy_csv"

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        """Each class a Gaussian blob around its own centre (the same at every hospital, from
        ``seed``); each hospital shifted a little and with its own prevalence."""
        columns = feature_columns(task_cfg)
        num_classes = int(task_cfg["spec"]["num_classes"])
        centres = np.random.default_rng([seed, 1]).normal(0.0, 1.5, (num_classes, len(columns)))
        rng = np.random.default_rng([seed, 2, profile.index])
        shift = 0.5 * (profile.shift["u"] - 0.5)
        folder.mkdir(parents=True, exist_ok=True)
        for split, size in zip(SPLITS, (profile.num_train, profile.num_test), strict=True):
            labels = rng.choice(num_classes, size=size, p=profile.class_weights)
            features = centres[labels] + shift + rng.normal(0.0, 1.0, (size, len(columns)))
            _write(folder / split, columns, features, labels)

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        """A pooled ``toy_csv`` dataset is a folder in the site format: its train.csv records,
        then its test.csv records; ``site_column`` another column of both files."""
        labels, groups = [], []
        for split in SPLITS:
            labels.append(read_split(Path(path) / split, task_cfg)[1])
            if site_column:
                groups += self._column(Path(path) / split, site_column)
        is_test = np.concatenate([np.zeros(len(labels[0]), bool), np.ones(len(labels[1]), bool)])
        return PooledRecords(labels=np.concatenate(labels), is_test=is_test,
                             groups=np.array(groups, dtype=object) if site_column else None)

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        columns = feature_columns(task_cfg)
        train, test = (read_split(Path(path) / split, task_cfg) for split in SPLITS)
        records = np.asarray(records, dtype=int)
        folder.mkdir(parents=True, exist_ok=True)
        for split, (features, labels), ids in (
                (SPLITS[0], train, records[records < len(train[1])]),
                (SPLITS[1], test, records[records >= len(train[1])] - len(train[1]))):
            _write(folder / split, columns, features[ids], labels[ids])

    @staticmethod
    def _column(path: Path, name: str) -> list[str]:
        from client.tasks import DataError

        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            header = next(rows)
            if name not in header:
                raise DataError(f"{path}: data.site_column={name!r} is not a column; found "
                                f"{header}")
            index = header.index(name)
            return [row[index] for row in rows if row]
