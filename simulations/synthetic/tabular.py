"""Tabular: synthetic heart-disease hospitals, and pooled tables dealt out to sites, both
written as the CSV the tabular loader (``client/tasks/tabular.py``) reads under the same
``task.*`` settings (header, delimiter, columns, ``task.file``)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.tasks import DataError
from client.tasks.tabular import SPLIT_FILES, TabularTask, parse_site, read_table, site_files
from simulations.synthetic.base import PooledRecords, SiteGenerator, SiteProfile
from simulations.synthetic.registry import register_generator


@register_generator
class TabularGenerator(SiteGenerator):
    name = "tabular"

    def index_pooled(
        self, path: Path, task_cfg: Mapping[str, Any], site_column: str | None = None
    ) -> PooledRecords:
        TabularTask.input_spec(task_cfg)
        parsed, is_test, _, table = parse_site(Path(path), task_cfg)
        groups = None
        if site_column:
            if site_column not in table.columns:
                raise DataError(f"{table.path}: data.site_column={site_column!r} is not a "
                                f"column; found {table.columns}")
            col = table.columns.index(site_column)
            groups = np.array([row[col] for row in table.rows], dtype=object)
        # a single pooled file has no test split of its own: each site splits its share
        if len(site_files(Path(path), task_cfg)) == 1:
            is_test = np.zeros(len(parsed.labels), bool)
        return PooledRecords(labels=parsed.labels, is_test=is_test, groups=groups)

    def write_partition(
        self, path: Path, task_cfg: Mapping[str, Any], folder: Path, records: np.ndarray
    ) -> None:
        files = site_files(Path(path), task_cfg)
        tables = [read_table(p, task_cfg) for p in files]
        records = np.asarray(records, dtype=int)
        folder.mkdir(parents=True, exist_ok=True)
        if len(tables) == 2:
            n_train = len(tables[0].rows)
            outputs = [(folder / SPLIT_FILES[0], tables[0], records[records < n_train]),
                       (folder / SPLIT_FILES[1], tables[1], records[records >= n_train] - n_train)]
        else:
            outputs = [(folder / _single_file_name(task_cfg, folder), tables[0], records)]
        for out, table, ids in outputs:
            _write_rows(out, task_cfg, table.columns, [table.rows[i] for i in ids])

    def generate_site(
        self, folder: Path, task_cfg: Mapping[str, Any], profile: SiteProfile, seed: int
    ) -> None:
        TabularTask.input_spec(task_cfg)
        rng = np.random.default_rng([seed, profile.index, 4])
        n = profile.num_train + profile.num_test
        records = synthetic_records(n, task_cfg, profile, rng)
        records[str(task_cfg["label"])] = records.pop("num")  # the label under its configured name
        folder.mkdir(parents=True, exist_ok=True)
        columns = list(task_cfg["columns"]) if task_cfg.get("columns") else list(records)
        missing = set(columns) - set(records)
        if missing:
            raise DataError(f"the synthetic generator writes the UCI heart-disease columns "
                            f"{list(records)}; task.columns also names {sorted(missing)}")
        # rows as tuples straight from the columns: csv writes them as it would lists
        rows = zip(*(records[c] for c in columns), strict=True)
        _write_rows(folder / _single_file_name(task_cfg, folder), task_cfg, columns, rows)



def _single_file_name(task_cfg: Mapping[str, Any], folder: Path) -> str:
    """A file name matching ``task.file``: its ``*`` becomes the site folder's name."""
    pattern = str(task_cfg.get("file", "*.csv"))
    name = pattern.replace("*", folder.name)
    if any(ch in name for ch in "?[]"):
        raise DataError(f"task.file={pattern!r}: cannot derive a file name to write (use a "
                        "pattern with only '*' wildcards)")
    return name


def _write_rows(path: Path, task_cfg: Mapping[str, Any], columns: Sequence[str],
                rows: Iterable[Sequence[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=str(task_cfg.get("delimiter", ",")),
                            lineterminator="\n")
        if str(task_cfg.get("header", "first_line")) != "none":
            writer.writerow(columns)
        writer.writerows(rows)


# --------------------------------------------------------------------------- synthetic sites


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def synthetic_records(n: int, task_cfg: Mapping[str, Any], profile: SiteProfile,
                      rng: np.random.Generator) -> dict[str, list[str]]:
    """Heart-disease-like records as the text a UCI ``processed.*.data`` file holds.

    Plausible clinical ranges; a logistic ground truth over age, sex, chest-pain type, max
    heart rate, exercise angina, ST depression, vessels coloured (ca), thal and cholesterol,
    with its intercept set so that the site's prevalence matches ``profile.class_weights``.
    Site shift from ``profile.shift``: u moves the age distribution, v the cholesterol level,
    the share of men and how numbers are written (``63`` vs ``63.0``), w how much goes
    unrecorded: a site with w > 0.6 rarely records ca/thal/slope and writes cholesterol as 0,
    like the real switzerland and va centres.
    """
    u, v, w = (float(profile.shift[k]) for k in ("u", "v", "w"))
    age = np.clip(rng.normal(47 + 14 * u, 8.5, n), 28, 77).round()
    sex = (rng.uniform(size=n) < 0.6 + 0.35 * v).astype(float)
    cp = rng.choice([1, 2, 3, 4], size=n, p=[0.07, 0.18, 0.27, 0.48])
    trestbps = np.clip(rng.normal(128 + 0.4 * (age - 54), 17, n), 92, 200).round()
    chol = np.clip(rng.normal(205 + 60 * v + 0.9 * (age - 54), 48, n), 110, 560).round()
    fbs = (rng.uniform(size=n) < 0.1 + 0.1 * v).astype(float)
    restecg = rng.choice([0, 1, 2], size=n, p=[0.55, 0.15, 0.30])
    thalach = np.clip(rng.normal(152 - 0.9 * (age - 54), 20, n), 70, 202).round()
    exang = (rng.uniform(size=n) < np.where(cp == 4, 0.5, 0.15)).astype(float)
    oldpeak = np.clip(rng.normal(0.6 + 0.9 * exang, 0.9, n), 0, 6.2).round(1)
    slope = np.where(oldpeak > 1.0, rng.choice([2, 3], size=n, p=[0.8, 0.2]),
                     rng.choice([1, 2], size=n, p=[0.7, 0.3]))
    ca = np.minimum(rng.poisson(np.clip(0.2 + 0.03 * (age - 45), 0.05, 2.0)), 3).astype(float)
    thal = rng.choice([3, 6, 7], size=n, p=[0.55, 0.07, 0.38])

    risk = (0.05 * (age - 54) + 0.9 * sex + 1.3 * (cp == 4) - 0.5 * (cp <= 2)
            - 0.03 * (thalach - 150) + 0.8 * exang + 0.5 * oldpeak + 0.8 * ca
            + 1.2 * (thal != 3) + 0.004 * (chol - 240) + 0.4 * (slope >= 2))
    risk = risk - risk.mean()
    prevalence = 1.0 - float(profile.class_weights[0])
    lo, hi = -20.0, 20.0  # intercept so that the expected prevalence matches the profile
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(risk + mid).mean() < prevalence else (lo, mid)
    latent = risk + lo + rng.logistic(size=n)  # P(latent > 0) = sigmoid(risk + b)
    label = _synthetic_label(latent, task_cfg, profile, rng)

    as_float = v > 0.5  # cleveland writes "63.0", hungarian "63"
    def text(values: np.ndarray, decimals: int = 0) -> list[str]:
        if decimals:
            return [f"{x:.{decimals}f}" for x in values]
        return [f"{x:.1f}" if as_float else f"{int(x)}" for x in values]

    sparse = w > 0.6  # a centre that rarely records the angiography-derived fields
    miss = {c: 0.005 + 0.015 * w for c in ("trestbps", "fbs", "restecg", "thalach", "exang",
                                           "oldpeak")}
    miss.update(ca=0.6 + 0.35 * w if sparse else 0.01, thal=0.4 + 0.4 * w if sparse else 0.01,
                slope=0.2 + 0.3 * w if sparse else 0.01, chol=0.02)
    columns = {
        "age": text(age), "sex": text(sex), "cp": text(cp), "trestbps": text(trestbps),
        "chol": text(chol), "fbs": text(fbs), "restecg": text(restecg),
        "thalach": text(thalach), "exang": text(exang), "oldpeak": text(oldpeak, 1),
        "slope": text(slope), "ca": text(ca), "thal": text(thal), "num": label,
    }
    for col, rate in miss.items():
        for i in np.flatnonzero(rng.uniform(size=n) < rate):
            columns[col][i] = "?"
    if sparse:  # switzerland writes an unmeasured cholesterol as 0, not "?"
        for i in np.flatnonzero(rng.uniform(size=n) < 0.3 + 0.7 * (w - 0.6) / 0.4):
            columns["chol"][i] = "0"
    return columns


def _synthetic_label(latent: np.ndarray, task_cfg: Mapping[str, Any], profile: SiteProfile,
                     rng: np.random.Generator) -> list[str]:
    """``num`` as the file writes it: 0, or 1-4 rising with the latent risk (binarised by
    ``label_threshold``); with ``label_classes``, ordinal cut points give the site's class
    proportions."""
    classes = task_cfg.get("label_classes")
    if classes is None:
        threshold = float(task_cfg["label_threshold"])
        severity = np.clip(1 + np.floor(latent / 1.5), 1, 4)
        values = np.where(latent > 0, math.floor(threshold) + severity, math.floor(threshold))
        return [f"{int(x)}" for x in values]
    # ordinal: class k where the latent risk falls between the site's quantile cut points
    cuts = np.quantile(latent, np.cumsum(profile.class_weights)[:-1])
    k = np.searchsorted(cuts, latent)
    return [str(classes[i]) for i in k]
