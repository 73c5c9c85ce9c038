"""Split one pooled dataset (``data.path``) into hospital folders.

``data.partition``:
- ``iid``: records shuffled and dealt out evenly;
- ``dirichlet``: label skew, each class's records split over sites by Dir(``data.alpha``)
  proportions (smaller alpha: more skew);
- ``quantity``: size skew, site sizes by Dir(``data.alpha``) proportions, labels iid;
- ``column``: one site per distinct value of ``data.site_column`` (tabular and notes).

Train and test records are split with the same per-site proportions, so a site's test split
looks like its training data. Each site folder is written in the task's own format by the
task's ``SiteGenerator.write_partition`` (``simulations/synthetic/``) and then read by the same
loader a hospital uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.tasks import DataError
from simulations.cache import write_folder_once

if TYPE_CHECKING:
    from simulations.synthetic import PooledRecords

PARTITIONS = ("iid", "dirichlet", "quantity", "column")


def check_partition_settings(data: Mapping[str, Any]) -> None:
    """``data.partition`` / ``data.alpha`` / ``data.site_column`` before anything is read: a bad
    value names its key even when no ``data.path`` is given (it would otherwise be ignored)."""
    method = data.get("partition", "iid")
    if method not in PARTITIONS:
        raise DataError(f"data.partition must be one of {list(PARTITIONS)}, got {method!r}")
    alpha = data.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        # numpy's Dirichlet would fail later with a message that names no key
        raise DataError(f"data.alpha must be a number > 0 (Dirichlet concentration), "
                        f"got {alpha!r}")
    if method == "column" and data.get("path") and not data.get("site_column"):
        raise DataError("data.partition=column needs data.site_column (the column naming "
                        "each record's hospital)")


def _split_by_proportions(ids: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(ids)).round().astype(int)
    return np.split(ids, cuts)


def assign_records(
    records: PooledRecords, num_sites: int, method: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Record indices per site (sorted). Every record goes to exactly one site."""
    if method not in PARTITIONS:
        raise DataError(f"data.partition must be one of {list(PARTITIONS)}, got {method!r}")
    rng = np.random.default_rng([seed, 31337])
    if method == "column":
        if records.groups is None:
            raise DataError("data.partition=column needs data.site_column")
        values = sorted(set(records.groups.tolist()), key=str)
        return [np.flatnonzero(records.groups == v) for v in values]
    sites: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    size_props = rng.dirichlet(np.full(num_sites, alpha)) if method == "quantity" else None
    class_props = {
        int(c): rng.dirichlet(np.full(num_sites, alpha)) for c in np.unique(records.labels)
    }
    for is_test in (False, True):
        part = np.flatnonzero(records.is_test == is_test)
        part = part[rng.permutation(len(part))]
        if method == "iid":
            chunks = np.array_split(part, num_sites)
        elif method == "quantity":
            chunks = _split_by_proportions(part, size_props)
        else:  # dirichlet: label skew
            chunks = [np.empty(0, dtype=int)] * num_sites
            for label, props in class_props.items():
                of_class = part[records.labels[part] == label]
                for i, chunk in enumerate(_split_by_proportions(of_class, props)):
                    chunks[i] = np.concatenate([chunks[i], chunk])
        for i, chunk in enumerate(chunks):
            sites[i].append(chunk)
    return [np.sort(np.concatenate(s)).astype(int) for s in sites]


def _site_name(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_") or "site"


def partition_sites(cfg: Mapping[str, Any], cache_dir: Path) -> dict[str, Path]:
    """Write (once, cached by content) and return the site folders for ``data.path``."""
    # imported here: the generators' own imports (images: SciPy) are not paid by a run on
    # synthetic sites before its round 1 (simulations/sites.py imports this module)
    from simulations.synthetic import get_generator

    data = cfg["data"]
    check_partition_settings(data)
    path = Path(data["path"]).expanduser()
    if not path.exists():
        raise DataError(f"data.path={path} does not exist; expected the pooled dataset to "
                        f"split into hospitals (a file or folder in the {cfg['task']['name']} "
                        "task's format)")
    method = str(data.get("partition", "iid"))
    column = data.get("site_column") if method == "column" else None
    num_sites = int(cfg["num_hospitals"])
    stat = path.stat()
    key_material = json.dumps(
        {"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
         "task": cfg["task"], "method": method, "alpha": data.get("alpha"), "column": column,
         "sites": num_sites, "seed": cfg["seed"]}, sort_keys=True, default=str)
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    target = cache_dir / "partitions" / f"{cfg['task']['name']}-{method}-{key}"
    generator = get_generator(cfg["task"]["name"])

    def split(staging: Path) -> None:
        records = generator.index_pooled(path, cfg["task"], site_column=column)
        assignment = assign_records(records, num_sites, method, float(data.get("alpha", 0.5)),
                                    int(cfg["seed"]))
        if method == "column":
            names = [_site_name(v) for v in sorted(set(records.groups.tolist()), key=str)]
        else:
            names = [f"hospital_{i + 1:02d}" for i in range(num_sites)]
        for name, ids in zip(names, assignment, strict=True):
            if not (~records.is_test[ids]).any():
                raise DataError(f"data.partition={method} left site {name} with zero "
                                f"training records from {path}; use fewer hospitals or a "
                                "larger data.alpha")
            generator.write_partition(path, cfg["task"], staging / name, ids)
        (staging / "partition.json").write_text(json.dumps(
            {"source": str(path), "method": method, "sites": {
                n: {"records": len(ids), "test": int(records.is_test[ids].sum())}
                for n, ids in zip(names, assignment, strict=True)}}, indent=2))

    write_folder_once(target, split)
    return {p.name: p for p in sorted(target.iterdir()) if p.is_dir()}
