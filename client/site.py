"""Who this site is and where its data lives: the site's own settings, never the server's.

In deployment they come from the SuperNode's ``--node-config`` (``site-id``,
``data-path``, ``device``, ``threads``, ``state-dir``, ``max-epsilon``). In the in-process
simulation Flower gives each virtual SuperNode only its ``partition-id``, so the simulation
passes the same keys per partition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class SiteSettings:
    site_id: str
    data_path: Path
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    state_dir: Path | None = None  # the site's own records (privacy ledger) survive restarts here
    max_epsilon: float | None = None  # the site's privacy budget; wins over the server's value

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        if "data-path" not in node_config:
            raise ValueError(
                "this SuperNode has no 'data-path' in its node config; start it with "
                "--node-config 'data-path=\"/path/to/site/folder\"'"
            )
        data_path = Path(str(node_config["data-path"])).expanduser()
        return cls(
            site_id=str(node_config.get("site-id", data_path.name)),
            data_path=data_path,
            device=str(node_config.get("device", "auto")),
            threads=int(node_config.get("threads", 0)),
            state_dir=(Path(str(node_config["state-dir"])).expanduser()
                       if node_config.get("state-dir") else None),
            max_epsilon=(float(node_config["max-epsilon"])
                         if node_config.get("max-epsilon") not in (None, "") else None),
        )


def simulated_site_from_root(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Node config for virtual SuperNode ``partition-id`` under ``flwr run`` (simulation only)."""
    root = str(run_config.get("data.root") or "")
    if not root or not Path(root).expanduser().is_dir():
        raise ValueError(
            "under `flwr run` with the simulation engine each virtual SuperNode needs its "
            "folder: pass --run-config 'data.root=\"/path/with/one/folder/per/hospital\"' "
            f"(got data.root={root!r})"
        )
    folders = sorted(p for p in Path(root).expanduser().iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    index = int(node_config[PARTITION_ID])
    if index >= len(folders):
        raise ValueError(f"virtual SuperNode {index} has no folder: data.root={root} has "
                         f"{len(folders)} sub-folders")
    return {"site-id": folders[index].name, "data-path": str(folders[index]), "threads": 1}
