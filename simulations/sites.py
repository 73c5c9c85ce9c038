"""Which folder is which hospital: a user's ``data.root``, a pooled ``data.path`` split by
``simulations/partition.py``, or synthetic sites written once.

Synthetic sites go to ``data.cache_dir/synthetic/<task>-<key>/`` where the key hashes
everything that shapes the files (task config, number of hospitals, seed), so a second run
reuses them and a changed config never reads stale files. The folder is written under a
temporary name and renamed when complete: an interrupted run never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.tasks import DataError, get_task
from simulations.cache import write_folder_once
from simulations.partition import check_partition_settings, partition_sites

GENERATOR_VERSION = 1  # bump when a generator's output changes


def site_folders(cfg: Mapping[str, Any]) -> dict[str, Path]:
    """Site id -> folder, in a stable order."""
    cache_dir = Path(cfg["data"]["cache_dir"]).expanduser()
    root, pooled = cfg["data"].get("root"), cfg["data"].get("path")
    check_partition_settings(cfg["data"])
    if root and pooled:
        raise DataError("give either data.root (one folder per hospital) or data.path (one "
                        "pooled dataset to split), not both")
    if pooled:
        return partition_sites(cfg, cache_dir)
    if root:
        root = Path(root).expanduser()
        if not root.is_dir():
            what = "a file" if root.exists() else "it does not exist"
            raise DataError(f"data.root={root} is not a directory ({what}); expected a folder "
                            "with one sub-folder per hospital")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            files = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
            raise DataError(f"data.root={root} has no sub-folders; expected one per hospital"
                            + (f" (found only files: {files[:5]}; for one pooled dataset "
                               "use data.path)" if files else ""))
        return {p.name: p for p in folders}
    return synthetic_sites(cfg["task"], int(cfg["num_hospitals"]), int(cfg["seed"]), cache_dir)


def synthetic_sites(
    task_cfg: Mapping[str, Any], num_sites: int, seed: int, cache_dir: Path
) -> dict[str, Path]:
    key_material = json.dumps(
        {"task": task_cfg, "sites": num_sites, "seed": seed, "v": GENERATOR_VERSION},
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    target = cache_dir / "synthetic" / f"{task_cfg['name']}-{key}"
    names = [f"hospital_{i + 1:02d}" if num_sites < 100 else f"hospital_{i + 1:04d}"
             for i in range(num_sites)]
    task = get_task(task_cfg["name"])

    def generate(staging: Path) -> None:
        for name, profile in zip(names, task.site_profiles(task_cfg, num_sites, seed),
                                 strict=True):
            task.generate_site(staging / name, task_cfg, profile, seed)
        (staging / "config.json").write_text(key_material)

    write_folder_once(target, generate)
    return {name: target / name for name in names}
