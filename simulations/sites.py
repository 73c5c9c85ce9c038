"""Which folder is which hospital: a user's ``data.root``, a pooled ``data.path`` split by
``simulations/partition.py``, or synthetic sites written once.

Synthetic sites go to ``data.cache_dir/synthetic/<task>-<key>/<site>/`` where the key hashes
everything that shapes the files (task config, number of hospitals, seed), so a second run
reuses them and a changed config never reads stale files. Each site folder is written under a
temporary name and renamed when complete: an interrupted run never leaves half a site.

``data.generate=on_first_use`` (the simulation's default): a site's files are written the
first time they are needed, by the simulated site itself when it is first sampled (or by the
server for the sites its pooled evaluation uses), so 1000 hospitals of which 10 train per
round do not all have to be written before round 1. ``upfront`` writes them all first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.tasks import DataError
from privacy.files import write_atomically
from simulations.cache import write_folder_once
from simulations.partition import check_partition_settings, partition_sites

if TYPE_CHECKING:
    from simulations.synthetic import SiteProfile

GENERATOR_VERSION = 2  # bump when a generator's output changes


def site_folders(cfg: Mapping[str, Any]) -> dict[str, Path]:
    """Site id -> folder, in a stable order; every folder exists."""
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
    sites = synthetic_sites(cfg["task"], int(cfg["num_hospitals"]), int(cfg["seed"]),
                            cache_dir)
    for site in sites.names:
        sites.ensure(site)
    return sites.folders()


def lazy_synthetic_sites(cfg: Mapping[str, Any]) -> SyntheticSites | None:
    """The run's synthetic sites, nothing written yet, when they are written on first use
    (``data.generate=on_first_use``, checked by server/settings.py); else None (a user's
    data.root or data.path, or ``upfront``: use :func:`site_folders`)."""
    data = cfg["data"]
    check_partition_settings(data)  # as site_folders: a bad data.* value is named either way
    # a config from before data.generate existed (a resumed run) wrote its sites up front
    if data.get("generate", "upfront") != "on_first_use" or data.get("root") or data.get("path"):
        return None
    return synthetic_sites(cfg["task"], int(cfg["num_hospitals"]), int(cfg["seed"]),
                           Path(data["cache_dir"]).expanduser())


@dataclass(frozen=True)
class SyntheticSites:
    """A run's synthetic hospitals; each site folder is written by :meth:`ensure`, once.

    Small and picklable: the simulation hands it to the simulated sites (Ray workers), which
    write their own folder when first sampled."""

    task_cfg: dict[str, Any]
    num_sites: int
    seed: int
    root: Path
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(
            f"hospital_{i + 1:02d}" if self.num_sites < 100 else f"hospital_{i + 1:04d}"
            for i in range(self.num_sites)))

    def folders(self) -> dict[str, Path]:
        return {name: self.root / name for name in self.names}

    @cached_property
    def _profiles(self) -> list[SiteProfile]:
        from simulations.synthetic import get_generator

        return get_generator(self.task_cfg["name"]).site_profiles(self.task_cfg,
                                                                  self.num_sites, self.seed)

    def ensure(self, site: str) -> Path:
        """The site's folder, written now if it does not exist yet."""
        folder = self.root / site
        if folder.is_dir():
            return folder
        if site not in self.names:
            raise DataError(f"no synthetic site {site!r}; this run has {self.names[0]} .. "
                            f"{self.names[-1]}")
        # the generators (images': SciPy) load when a site is first written, not before round 1
        from simulations.synthetic import get_generator

        generator = get_generator(self.task_cfg["name"])
        profile = self._profiles[self.names.index(site)]
        write_folder_once(folder, lambda staging: generator.generate_site(staging, self.task_cfg,
                                                                          profile, self.seed))
        return folder


def synthetic_sites(
    task_cfg: Mapping[str, Any], num_sites: int, seed: int, cache_dir: Path
) -> SyntheticSites:
    """The synthetic sites of this (task, number of sites, seed); nothing is written yet
    except the folder and its config.json (what the key was made of)."""
    # how a loader standardises is not part of the files: DP and non-DP runs share them
    files_cfg = {k: v for k, v in task_cfg.items() if k not in ("standardize", "reference")}
    key_material = json.dumps(
        {"task": files_cfg, "sites": num_sites, "seed": seed, "v": GENERATOR_VERSION},
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    root = cache_dir / "synthetic" / f"{task_cfg['name']}-{key}"
    if not (root / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_atomically(root / "config.json", key_material.encode())
    return SyntheticSites(dict(task_cfg), num_sites, seed, root)
