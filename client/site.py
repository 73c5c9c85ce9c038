"""Who this site is, where its data lives and what it allows: the site's own settings, never
the server's.

In deployment a hospital keeps them in its own site configuration file (TOML, written from the
template ``python -m server.provision`` puts in each bundle), named by the SuperNode's node
config: ``--node-config 'site-config="/etc/medsilo/site.toml"'``::

    site_id = "hospital_a"
    task = "tabular"                     # runs of another task are refused
    data_path = "/data/heart"
    state_dir = "/var/lib/medsilo/hospital_a"   # privacy ledger, egress log
    device = "auto"
    threads = 0
    max_epsilon = 8.0                    # wins over privacy.max_epsilon sent by the server
    delta = 1e-5                         # wins over privacy.delta sent by the server
    require_approval = true              # the default in deployment
    approved_app_hashes = ["<64 hex>"]   # `python -m client.approval hash` of reviewed releases

The same keys also work directly as node config with dashes (``data-path``, ``state-dir``,
``max-epsilon``, ``approved-app-hashes="h1,h2"``, ...), as before the file existed; a node config
names either the file or the keys, never both. In the in-process simulation Flower gives each
virtual SuperNode only its ``partition-id``, so the simulation passes the same keys per partition
and approval is off unless a site asks for it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTITION_ID = "partition-id"
SITE_CONFIG = "site-config"  # node config key naming the site configuration file
SITE_KEYS = ("site-id", "data-path", "device", "threads", "state-dir", "max-epsilon", "delta",
             "task", "require-approval", "approved-app-hashes")
APP_HASH = re.compile(r"^[0-9a-f]{64}$")


class SiteConfigError(ValueError):
    """A site setting is missing or malformed; the message names the source and the key."""


@dataclass(frozen=True)
class SiteSettings:
    site_id: str
    data_path: Path
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    state_dir: Path | None = None  # the site's own records (ledger, egress log) survive here
    max_epsilon: float | None = None  # the site's privacy budget; wins over the server's value
    delta: float | None = None  # the site's δ; wins over the server's value
    task: str | None = None  # the task this site's data is for; None: whatever the run asks
    # Fail closed: only the simulation turns approval off, explicitly.
    require_approval: bool = True
    approved_app_hashes: tuple[str, ...] = ()

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], *, simulation: bool = False
    ) -> SiteSettings:
        """The site's settings from its SuperNode's node config (or the file it names).

        ``simulation=True`` (virtual SuperNodes on this machine) turns approval off unless the
        node config asks for it; deployed SuperNodes require approval unless told otherwise.
        """
        if node_config.get(SITE_CONFIG):
            clash = sorted(k for k in SITE_KEYS if k in node_config)
            if clash:
                raise SiteConfigError(
                    f"the node config names a site configuration file ({SITE_CONFIG}) and also "
                    f"sets {clash}; put these in the file only")
            return cls.from_file(Path(str(node_config[SITE_CONFIG])).expanduser(),
                                 simulation=simulation)
        if "data-path" not in node_config:
            raise SiteConfigError(
                "this SuperNode has no 'data-path' in its node config; start it with "
                "--node-config 'site-config=\"/path/to/site.toml\"' or "
                "--node-config 'data-path=\"/path/to/site/folder\"'"
            )
        values = {k: node_config[k] for k in SITE_KEYS if k in node_config}
        return cls._from_values(values, "node config", simulation=simulation)

    @classmethod
    def from_file(cls, path: Path, *, simulation: bool = False) -> SiteSettings:
        """Read a site configuration file (TOML, keys with underscores)."""
        if not path.is_file():
            raise SiteConfigError(f"site configuration file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise SiteConfigError(f"site configuration file {path} is not valid TOML: {err}") \
                from err
        values = {str(k).replace("_", "-"): v for k, v in raw.items()}
        unknown = sorted(k.replace("-", "_") for k in values if k not in SITE_KEYS)
        if unknown:
            raise SiteConfigError(
                f"{path}: unknown key(s) {unknown}; expected some of "
                f"{[k.replace('-', '_') for k in SITE_KEYS]}")
        if "data-path" not in values:
            raise SiteConfigError(f"{path}: 'data_path' (this site's data folder) is required")
        return cls._from_values(values, str(path), simulation=simulation)

    @classmethod
    def _from_values(
        cls, values: Mapping[str, Any], source: str, *, simulation: bool
    ) -> SiteSettings:
        def number(key: str) -> float | None:
            value = values.get(key)
            if value is None or value == "":
                return None
            try:
                return float(value)
            except (TypeError, ValueError) as err:
                raise SiteConfigError(f"{source}: {key} must be a number, got {value!r}") from err

        def path(key: str) -> Path | None:
            value = values.get(key)
            return Path(str(value)).expanduser() if value not in (None, "") else None

        data_path = path("data-path")
        if data_path is None:
            raise SiteConfigError(f"{source}: data-path must name this site's data folder")
        max_epsilon, delta = number("max-epsilon"), number("delta")
        if max_epsilon is not None and max_epsilon <= 0:
            raise SiteConfigError(f"{source}: max-epsilon must be > 0, got {max_epsilon}")
        if delta is not None and not 0 < delta < 1:
            raise SiteConfigError(f"{source}: delta must be in (0, 1), got {delta}")
        threads = values.get("threads", 0)
        if isinstance(threads, bool) or not str(threads).isdigit():
            raise SiteConfigError(f"{source}: threads must be an integer >= 0, got {threads!r}")
        return cls(
            site_id=str(values.get("site-id") or data_path.name),
            data_path=data_path,
            device=str(values.get("device", "auto")),
            threads=int(threads),
            state_dir=path("state-dir"),
            max_epsilon=max_epsilon,
            delta=delta,
            task=str(values["task"]) if values.get("task") else None,
            require_approval=_boolean(values.get("require-approval", not simulation),
                                      "require-approval", source),
            approved_app_hashes=_app_hashes(values.get("approved-app-hashes", ()), source),
        )


def _boolean(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise SiteConfigError(f"{source}: {key} must be true or false, got {value!r}")


def _app_hashes(value: Any, source: str) -> tuple[str, ...]:
    """A TOML list, or in node config one string of hashes separated by commas or spaces."""
    items = re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else list(value)
    hashes = tuple(str(h).lower() for h in items if str(h))
    for h in hashes:
        if not APP_HASH.match(h):
            raise SiteConfigError(
                f"{source}: approved-app-hashes holds {h!r}; expected 64 hex digits as printed "
                "by `python -m client.approval hash`")
    return hashes


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
