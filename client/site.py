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
    # the site's privacy policy (client/policy.py): the server proposes, the site disposes
    require_dp = true                    # default: true in deployment and with max_epsilon
    min_noise_multiplier = 0.5           # never train with a smaller sigma
    max_grad_norm_range = [0.1, 10.0]    # accepted per-sample clipping bounds C
    allowed_tasks = ["tabular"]          # runs of other tasks are refused (also: task)
    allowed_models = ["mlp", "logreg"]   # runs of other models are refused
    secagg_min_threshold = 3             # never share secrets with a smaller Shamir threshold
    max_hospital_epsilon = 4.0           # require privacy=site_dp at most this hospital-level eps
    max_hospital_delta = 1e-5            # refuse a larger hospital-level delta (the default)
    identity_key = "supernode.key"       # this site's provisioned P-384 key (signs SecAgg keys)
    roster = "roster.json"               # the federation roster signed by the CA
    ca_cert = "ca.crt"                   # the federation CA (verifies the roster)
    plugins = ["my_package.medsilo_plugin"]  # this site's own installed code (docs/extending.md)

The same keys also work directly as node config with dashes (``data-path``, ``state-dir``,
``max-epsilon``, ``approved-app-hashes="h1,h2"``, ...), as before the file existed; a node config
names either the file or the keys, never both. In the in-process simulation Flower gives each
virtual SuperNode only its ``partition-id``, so the simulation passes the same keys per partition
and approval is off unless a site asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.run_settings import is_module_name

PARTITION_ID = "partition-id"
SITE_CONFIG = "site-config"  # node config key naming the site configuration file
SITE_KEYS = ("site-id", "data-path", "device", "threads", "state-dir", "max-epsilon", "delta",
             "task", "require-approval", "approved-app-hashes",
             # the site's privacy policy (client/policy.py) and its identity for SecAgg
             "require-dp", "min-noise-multiplier", "max-grad-norm-range", "allowed-tasks",
             "allowed-models", "secagg-min-threshold", "identity-key", "roster", "ca-cert",
             # modules of the site's own installed code (models, tasks) it lets a run use
             "plugins",
             # hospital-level DP (privacy=site_dp): the largest epsilon and delta it accepts
             "max-hospital-epsilon", "max-hospital-delta")
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
    # The site's privacy policy (client/policy.py checks a run against it before any data is
    # read). require_dp: a run without DP-SGD is refused; True in deployment by default and
    # whenever the site sets max_epsilon; False only in simulation unless asked for.
    require_dp: bool = True
    min_noise_multiplier: float | None = None  # the site never trains with a smaller sigma
    max_grad_norm_range: tuple[float, float] | None = None  # accepted clipping bounds C
    allowed_tasks: tuple[str, ...] = ()  # empty: any task (``task`` still applies)
    allowed_models: tuple[str, ...] = ()  # empty: any model
    secagg_min_threshold: int | None = None  # Shamir threshold floor (beside the majority rule)
    # The site's identity in secure aggregation: its provisioned P-384 private key, the
    # federation roster signed by the CA, and the CA certificate that verifies it.
    identity_key: Path | None = None
    roster: Path | None = None
    ca_cert: Path | None = None
    # Modules of code this site installed and reviewed (a model or task outside medsilo,
    # docs/extending.md). The site imports only these, never a module the server names: a run
    # needing another one is refused (plugin_refusal).
    plugins: tuple[str, ...] = ()
    # privacy=site_dp: a run planning a larger hospital-level epsilon is refused (the site
    # computes the noise from it itself: client/site_dp.py), and so is a run without
    # hospital-level DP. None: no cap of its own, no requirement
    max_hospital_epsilon: float | None = None
    # privacy=site_dp: the largest hospital-level delta this site accepts. Held here, not only
    # checked against 1/num_sites: num_sites is the server's word (a server understating it
    # could ask for a delta that guarantees nothing)
    max_hospital_delta: float = 1e-5
    simulated: bool = False  # a virtual SuperNode of a simulation on this machine

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
        max_hospital_epsilon = number("max-hospital-epsilon")
        if max_hospital_epsilon is not None and max_hospital_epsilon <= 0:
            raise SiteConfigError(f"{source}: max-hospital-epsilon must be > 0, got "
                                  f"{max_hospital_epsilon}")
        max_hospital_delta = number("max-hospital-delta")
        if max_hospital_delta is not None and not 0 < max_hospital_delta < 1:
            raise SiteConfigError(f"{source}: max-hospital-delta must be in (0, 1), got "
                                  f"{max_hospital_delta}")
        min_sigma = number("min-noise-multiplier")
        if min_sigma is not None and min_sigma < 0:
            raise SiteConfigError(f"{source}: min-noise-multiplier must be >= 0, got {min_sigma}")
        clip_range = _number_range(values.get("max-grad-norm-range"), "max-grad-norm-range",
                                   source)
        floor = values.get("secagg-min-threshold")
        if floor not in (None, "") and (isinstance(floor, bool) or not str(floor).isdigit()
                                        or int(floor) < 2):
            raise SiteConfigError(f"{source}: secagg-min-threshold must be an integer >= 2, "
                                  f"got {floor!r}")
        require_dp = values.get("require-dp")
        if require_dp in (None, ""):
            # fail closed: a deployed site, or one with a budget, requires DP unless it says not
            require_dp = (not simulation) or max_epsilon is not None
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
            require_dp=_boolean(require_dp, "require-dp", source),
            min_noise_multiplier=min_sigma,
            max_grad_norm_range=clip_range,
            allowed_tasks=_names(values.get("allowed-tasks", ()), "allowed-tasks", source),
            allowed_models=_names(values.get("allowed-models", ()), "allowed-models", source),
            secagg_min_threshold=int(floor) if floor not in (None, "") else None,
            identity_key=path("identity-key"),
            roster=path("roster"),
            ca_cert=path("ca-cert"),
            plugins=_module_names(values.get("plugins", ()), source),
            max_hospital_epsilon=max_hospital_epsilon,
            **({"max_hospital_delta": max_hospital_delta}
               if max_hospital_delta is not None else {}),
            simulated=simulation,
        )


def _boolean(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise SiteConfigError(f"{source}: {key} must be true or false, got {value!r}")


def _items(value: Any) -> Any:
    """A TOML list as it is, or a node-config string split at commas or spaces."""
    return re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else value


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    """A TOML list of names, or in node config one string separated by commas or spaces."""
    if value in (None, ""):
        return ()
    items = _items(value)
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise SiteConfigError(f"{source}: {key} must be a list of names, got {value!r}")
    return tuple(i for i in items if i)


def _module_names(value: Any, source: str) -> tuple[str, ...]:
    """``plugins``: importable module names (a TOML list, or in node config one string)."""
    names = _names(value, "plugins", source)
    for name in names:
        if not is_module_name(name):
            raise SiteConfigError(f"{source}: plugins holds {name!r}; expected dotted module "
                                  "names such as 'my_package.medsilo_plugin'")
    return names


def plugin_refusal(site: SiteSettings, wanted: Sequence[str]) -> str | None:
    """Why this site will not run code from the plugins ``wanted`` (the run's ``plugins``), or
    None. Checked before anything is imported: a site imports only what its own configuration
    lists, and says so when one of those is not installed here."""
    missing = [name for name in wanted if name not in site.plugins]
    if missing:
        return (f"this run needs plugin(s) {missing} (a model or task outside medsilo), which "
                f"this site does not list in its plugins {list(site.plugins)}: a site runs only "
                "code it installed and reviewed; install the package here and add it to "
                "plugins in site.toml (docs/extending.md)")
    for name in wanted:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package missing
            found = False
        if not found:
            return (f"plugin {name!r} is in this site's plugins but not installed in its "
                    f"Python environment ({sys.executable}): pip install the reviewed package "
                    "here (docs/extending.md)")
    return None


def import_plugins(names: Sequence[str]) -> None:
    """Import the plugin modules ``names`` in this process: their models, tasks (and in
    simulation synthetic generators) register on import. Ray workers and deployed ClientApp
    processes do not share the driver's imports, so each imports them itself (cached by
    ``sys.modules`` after the first message)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise SiteConfigError(f"plugin {name!r} cannot be imported at this site ({err}); "
                                  "install the reviewed package here (docs/extending.md)"
                                  ) from err


def _number_range(value: Any, key: str, source: str) -> tuple[float, float] | None:
    """``[low, high]`` (TOML list, or "low,high" in node config) with 0 < low <= high."""
    if value in (None, ""):
        return None
    try:
        low, high = (float(v) for v in _items(value))
    except (TypeError, ValueError) as err:
        raise SiteConfigError(f"{source}: {key} must be [low, high], got {value!r}") from err
    if not 0 < low <= high:
        raise SiteConfigError(f"{source}: {key} must satisfy 0 < low <= high, got {value!r}")
    return low, high


def _app_hashes(value: Any, source: str) -> tuple[str, ...]:
    """A TOML list, or in node config one string of hashes separated by commas or spaces."""
    hashes = tuple(str(h).lower() for h in _items(value) if str(h))
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
    # secure aggregation: a throw-away CA, roster and key per virtual site, shared by the
    # virtual SuperNodes of this machine (simulation only; deployed sites are provisioned)
    import hashlib
    import tempfile

    from privacy.secagg.identity import write_ephemeral_federation

    key = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:16]
    identities = write_ephemeral_federation(
        Path(tempfile.gettempdir()) / f"medsilo-secagg-{key}", [f.name for f in folders])
    # the run's plugins are installed on this machine, which runs every virtual SuperNode
    plugins = str(run_config.get("plugins") or "").strip("[] ")
    return {"site-id": folders[index].name, "data-path": str(folders[index]), "threads": 1,
            **({"plugins": plugins} if plugins else {}), **identities[folders[index].name]}
