"""The run's configuration: composed by Hydra from ``conf/``, checked before anything starts.

``python -m simulations.run`` gets it from ``@hydra.main``; the deployed ServerApp composes the
same ``conf/`` with ``flwr run --run-config`` values as Hydra overrides, so both paths share
one schema and one set of checks.
"""

from __future__ import annotations

import ast
import functools
import importlib
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from privacy.run_settings import (
    HospitalPrivacySettings,
    PrivacySettings,
    RunSettings,
    TrainSettings,
    is_module_name,
)

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
DEVICES = ("auto", "cpu", "cuda", "mps")
# Reference models trained beside the federation (simulation only: simulations/baselines.py)
BASELINES = ("local", "pooled")
# task.standardize (tabular, vitals): whose statistics standardise features (client/tasks/base.py)
STANDARDIZE = ("site", "reference", "auto")


# Three lists of names validate() checks against are read from our source, not imported:
# models/ and client/tasks/ load torch and Opacus as they register (2-5 s), privacy/protocol.py
# loads Flower, and `--help` or a typo must be answered before either (issue 18).
# tests/test_startup.py and tests/test_extending.py check that they equal what the imported
# modules hold. Names registered by a run's own plugins are known only by importing them
# (load_plugins): a run that names plugins pays that import, a run without them does not.
@functools.cache
def registered_model_names() -> list[str]:
    """``models.registered_models()`` without importing models/: the literal names of its
    ``@register_model("name")`` decorators (models/registry.py reads the same decorators to
    import a family when a model of it is first built)."""
    names = set()
    for path in sorted((ROOT / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "register_model" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return sorted(names)


@functools.cache
def registered_task_names() -> list[str]:
    """``client.tasks.registered_tasks()`` without importing client/tasks/: the ``name = "..."``
    of each class decorated ``@register_task`` there."""
    return _task_names_in(sorted((ROOT / "client" / "tasks").glob("*.py")))


def _task_names_in(paths: list[Path]) -> list[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Name | ast.Attribute)
                    and (getattr(d, "id", None) or getattr(d, "attr", None)) == "register_task"
                    for d in node.decorator_list):
                names.update(
                    item.value.value for item in node.body
                    if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant)
                    and [getattr(t, "id", None) for t in item.targets] == ["name"])
    return sorted(names)


# Modules of a run's own code (docs/extending.md): ``plugins`` register models and tasks (the
# server imports them here; every site imports them before it builds the model, if its own
# configuration lists them: client/site.py); ``simulation.plugins`` register what only a
# simulation needs (synthetic site generators), imported by the driver and the simulated sites
# and never sent to a site. Both are lists of importable module names, empty by default.
PLUGIN_KEYS = ("plugins", "simulation.plugins")


def _plugins_value(cfg: Mapping[str, Any], key: str) -> Any:
    group = (cfg.get("simulation") or {}) if key == "simulation.plugins" else cfg
    value = group.get("plugins")
    return list(value) if isinstance(value, ListConfig) else value


def plugin_modules(cfg: Mapping[str, Any], key: str = "plugins") -> tuple[str, ...]:
    """The module names under ``key`` (one of PLUGIN_KEYS): () when the key is absent."""
    value = _plugins_value(cfg, key)
    return () if value is None else tuple(value)


def _validate_plugins(cfg: DictConfig | Mapping[str, Any]) -> None:
    what = "(importable modules that register your own models and tasks, docs/extending.md)"
    for key in PLUGIN_KEYS:
        value = _plugins_value(cfg, key)
        _check(value is None or isinstance(value, list | tuple), key,
               f"a list of module names {what}", value)
        names = list(value or ())
        for index, name in enumerate(names):
            _check(is_module_name(name), f"{key}[{index}]",
                   f"a dotted module name such as 'my_package.medsilo_plugin' {what}", name)
        _check(len(set(names)) == len(names), key, f"a list without repeats {what}", names)


def load_plugins(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Import ``plugins`` and ``simulation.plugins`` in this process (registration happens on
    import); a module that cannot be imported, or whose registration fails, is a ConfigError
    naming the key. Nothing is imported when both lists are empty."""
    for key in PLUGIN_KEYS:
        for index, name in enumerate(plugin_modules(cfg, key)):
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise ConfigError(
                    f"{key}[{index}]={name!r} cannot be imported ({err}); expected a module "
                    "installed in this Python environment (pip install your package, or put "
                    "its folder on PYTHONPATH; docs/extending.md)") from err
            except Exception as err:  # e.g. a model name registered twice
                raise ConfigError(f"{key}[{index}]={name!r} failed while registering: "
                                  f"{type(err).__name__}: {err}") from err


def known_model_names(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """Our models, plus those the run's plugins registered (load_plugins first)."""
    if not any(plugin_modules(cfg, key) for key in PLUGIN_KEYS):
        return registered_model_names()
    from models import registered_models

    return sorted({*registered_model_names(), *registered_models()})


def known_task_names(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """Our tasks, plus the ``@register_task`` classes in the loaded modules of the run's plugin
    packages (load_plugins first). Read from their source like ours: the server never imports
    client/, whose registry holds them (tests/test_layering.py)."""
    packages = {name.split(".")[0] for key in PLUGIN_KEYS for name in plugin_modules(cfg, key)}
    paths = sorted({Path(module.__file__) for name, module in list(sys.modules.items())
                    if name.split(".")[0] in packages
                    and str(getattr(module, "__file__", None) or "").endswith(".py")})
    return sorted({*registered_task_names(), *_task_names_in(paths)})


@functools.cache
def class_balance_modes() -> tuple[str, ...]:
    """``privacy.protocol.CLASS_BALANCE`` without importing Flower with it."""
    path = ROOT / "privacy" / "protocol.py"
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if (isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["CLASS_BALANCE"]):
            return tuple(ast.literal_eval(node.value))
    raise LookupError(f"CLASS_BALANCE is no longer assigned a literal in {path}")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key and what is expected."""


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` on the first out-of-range value."""
    for key in ("num_hospitals", "rounds", "local_epochs", "batch_size", "min_sites"):
        _check(_is_int(cfg[key]) and cfg[key] >= 1, key, "an integer >= 1", cfg[key])
    _check(_is_number(cfg["lr"]) and cfg["lr"] > 0, "lr", "a number > 0", cfg["lr"])
    _check(_is_number(cfg["momentum"]) and 0 <= cfg["momentum"] < 1, "momentum",
           "a number in [0, 1)", cfg["momentum"])
    _check(_is_int(cfg["seed"]) and cfg["seed"] >= 0, "seed", "an integer >= 0", cfg["seed"])
    _check(cfg["optimizer"] in ("sgd", "adam"), "optimizer", "one of ['sgd', 'adam']",
           cfg["optimizer"])
    wait = cfg.get("connect_timeout_s", 120)
    _check(_is_number(wait) and wait > 0, "connect_timeout_s", "a number of seconds > 0", wait)
    upload = cfg.get("upload_timeout_s", 120)
    _check(_is_number(upload) and upload > 0, "upload_timeout_s", "a number of seconds > 0",
           upload)
    decay = cfg.get("weight_decay", 0.0)
    _check(_is_number(decay) and decay >= 0, "weight_decay", "a number >= 0", decay)
    balance, modes = cfg.get("class_balance", "none"), class_balance_modes()
    _check(balance in modes, "class_balance", f"one of {list(modes)}", balance)
    prior = cfg["task"].get("class_prior")
    classes = cfg["task"]["spec"]["num_classes"]
    _check(prior is None or (isinstance(prior, list | tuple | ListConfig)
                             and len(prior) == classes
                             and all(_is_number(p) and p > 0 for p in prior)),
           "task.class_prior", f"null or {classes} numbers > 0 (a public prevalence per class, "
           "task.spec.num_classes)", prior)
    _check(not (balance == "logit_adjust" and record_privacy(cfg)["name"] != "off"
                and prior is None), "class_balance",
           "'auto' or 'none' with privacy=dp unless task.class_prior gives a public prior "
           "(logit_adjust would use each site's exact label counts, which DP-SGD does not "
           "cover)", balance)
    per_round = cfg.get("sites_per_round")
    _check(per_round is None or (_is_int(per_round) and per_round >= 1)
           or (isinstance(per_round, float) and 0 < per_round < 1), "sites_per_round",
           "an integer >= 1, a fraction in (0, 1) of num_hospitals, or null (every site)",
           per_round)
    _check(cfg.get("final_evaluation", "all") in ("all", "sampled"), "final_evaluation",
           "'all' or 'sampled'", cfg.get("final_evaluation"))
    standardize = cfg["task"].get("standardize")
    _check(standardize is None or standardize in STANDARDIZE, "task.standardize",
           f"one of {list(STANDARDIZE)}", standardize)
    for name, entry in (cfg["task"].get("reference") or {}).items():
        _check(isinstance(entry, list | tuple | ListConfig) and len(entry) == 2
               and all(_is_number(x) for x in entry) and entry[1] > 0,
               f"task.reference.{name}", "[mean, sd] with sd > 0", entry)
    _validate_simulation(cfg["simulation"])
    _validate_baselines(cfg.get("baselines", "auto"))
    generate = cfg["data"].get("generate", "upfront")
    _check(generate in ("on_first_use", "upfront"), "data.generate",
           "'on_first_use' or 'upfront'", generate)
    if per_round is not None:
        for key in ("fraction_train", "fraction_evaluate"):
            value = cfg["strategy"].get(key, 1.0)
            _check(value == 1.0, f"strategy.{key}", "1.0 when sites_per_round is set (both "
                   "would choose the sites of a round; set one)", value)
    _check(cfg["device"] in DEVICES, "device", f"one of {list(DEVICES)}", cfg["device"])
    _validate_plugins(cfg)
    for key in ("fraction_train", "fraction_evaluate"):
        value = cfg["strategy"].get(key, 1.0)
        _check(_is_number(value) and 0 < value <= 1, f"strategy.{key}", "a number in (0, 1]",
               value)
    if cfg["strategy"]["name"] == "trimmedavg":
        beta = cfg["strategy"].get("beta")
        _check(_is_number(beta) and 0 <= beta < 0.5, "strategy.beta", "a number in [0, 0.5)",
               beta)
    if cfg["strategy"]["name"] == "krum":
        f = cfg["strategy"].get("num_malicious_nodes")
        _check(_is_int(f) and f >= 0, "strategy.num_malicious_nodes", "an integer >= 0", f)
    bound = cfg["validation"]["max_update_norm"]
    _check(bound is None or (_is_number(bound) and bound > 0), "validation.max_update_norm",
           "a number > 0 or null", bound)
    _check(_is_int(cfg["validation"]["max_examples"]) and cfg["validation"]["max_examples"] >= 1,
           "validation.max_examples", "an integer >= 1", cfg["validation"]["max_examples"])
    if cfg["strategy"]["name"] == "fedprox":
        mu = cfg["strategy"].get("proximal_mu")
        _check(_is_number(mu) and mu >= 0, "strategy.proximal_mu", "a number >= 0", mu)
    _validate_privacy(cfg)
    _validate_site_policy(cfg)
    _validate_secagg(cfg)
    # last: with plugins this imports them (torch and all, seconds), so every other mistake is
    # answered first; a plugin's model or task is known once its module is imported
    load_plugins(cfg)
    own_code = ("; a model of your own: name the module registering it in plugins, "
                "docs/extending.md")
    models = known_model_names(cfg)
    _check(cfg["model"]["name"] in models, "model.name", f"one of {models}{own_code}",
           cfg["model"]["name"])
    tasks = known_task_names(cfg)
    _check(cfg["task"]["name"] in tasks, "task.name",
           f"one of {tasks}{own_code.replace('model', 'task')}", cfg["task"]["name"])


def _validate_simulation(simulation: DictConfig | Mapping[str, Any]) -> None:
    address = simulation.get("ray_address")
    _check(address is None or (isinstance(address, str) and address.strip() != ""),
           "simulation.ray_address", "a Ray cluster address such as '10.0.0.5:6379' (or "
           "'auto') or null", address)
    cap = simulation.get("pooled_eval_sites")
    _check(cap is None or (_is_int(cap) and cap >= 1), "simulation.pooled_eval_sites",
           "an integer >= 1 or null (every site)", cap)
    _check(address is None or not str(address).startswith("ray://"), "simulation.ray_address",
           "a cluster's GCS address HOST:PORT as printed by `ray start --head` (not a Ray "
           "Client ray:// address: run the simulation on a machine of the cluster, "
           "docs/ray_cluster.md)", address)
    store = simulation.get("object_store_mb")
    _check(store is None or (_is_int(store) and store >= 78), "simulation.object_store_mb",
           "an integer >= 78 (Ray's minimum, MiB) or null", store)
    # refused rather than ignored: a run with another store size than its config says misleads
    _check(store is None or address is None, "simulation.object_store_mb",
           "null with simulation.ray_address (each cluster node fixes its object store at "
           "`ray start --object-store-memory=BYTES`)", store)


def _validate_baselines(value: Any) -> None:
    if value is None or (isinstance(value, str) and value in ("auto", "none", *BASELINES)):
        return
    names = list(value) if isinstance(value, list | tuple | ListConfig) else None
    _check(names is not None and len(set(map(str, names))) == len(names)
           and all(isinstance(n, str) and n in BASELINES for n in names), "baselines",
           f"'auto', a list of some of {list(BASELINES)} without repeats, or [] / none / null "
           "(no baselines)", value)


def baseline_kinds(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The baselines a run asks for: ``auto`` is all of them up to MANY_SITES hospitals (where
    report.md still lists every site; above, one model per site would double a long run)."""
    from server.site_summary import MANY_SITES  # numpy, which validate() does not need

    value = cfg.get("baselines", "auto")
    if isinstance(value, str) and value == "auto":
        return BASELINES if int(cfg["num_hospitals"]) <= MANY_SITES else ()
    if value is None or value == "none":
        return ()
    names = [value] if isinstance(value, str) else list(value)
    return tuple(kind for kind in BASELINES if kind in names)


def sites_per_round(cfg: Mapping[str, Any]) -> int:
    """How many sites train in a round: ``sites_per_round`` resolved against num_hospitals."""
    value, total = cfg.get("sites_per_round"), int(cfg["num_hospitals"])
    if value is None:
        return total
    if isinstance(value, float):
        return max(1, min(total, math.ceil(value * total)))
    return min(total, int(value))


def _validate_secagg(cfg: DictConfig | Mapping[str, Any]) -> None:
    secagg = cfg["secagg"]
    _check(secagg["name"] in ("off", "on"), "secagg", "'off' or 'on'", secagg["name"])
    if secagg["name"] == "off":
        return
    _check(cfg["strategy"]["name"] in ("fedavg", "fedprox", "fedadam", "fedyogi"), "strategy",
           "fedavg, fedprox, fedadam or fedyogi with secagg=on (robust strategies need each "
           "site's update, which secure aggregation hides)", cfg["strategy"]["name"])
    for key in ("threshold", "neighbours"):
        value = secagg.get(key)
        _check(value is None or (_is_int(value) and value >= 2), f"secagg.{key}",
               "an integer >= 2 or null", value)
    _check(_is_number(secagg["clip"]) and secagg["clip"] > 0, "secagg.clip", "a number > 0",
           secagg["clip"])
    _check(_is_int(secagg["max_site_examples"]) and secagg["max_site_examples"] >= 1,
           "secagg.max_site_examples", "an integer >= 1", secagg["max_site_examples"])
    _check(_is_number(secagg["stage_timeout_s"]) and secagg["stage_timeout_s"] > 0,
           "secagg.stage_timeout_s", "a number > 0", secagg["stage_timeout_s"])
    _check(cfg["num_hospitals"] >= 2, "num_hospitals", "at least 2 with secagg=on",
           cfg["num_hospitals"])
    _check(sites_per_round(cfg) >= 2, "sites_per_round", "at least 2 sites a round with "
           "secagg=on (one site's masked sum would be its own update)",
           cfg.get("sites_per_round"))


def record_privacy(cfg: DictConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    """The record-level (DP-SGD) part of ``privacy``: itself for off/dp; under site_dp its
    ``record_dp`` block when ``record_level=dp``, else ``{"name": "off"}``."""
    privacy = cfg["privacy"]
    if privacy["name"] != "site_dp":
        return privacy
    return privacy["record_dp"] if privacy.get("record_level") == "dp" else {"name": "off"}


# conf/privacy/site_dp.yaml keys that stay with the server (never sent to the sites)
HOSPITAL_SERVER_KEYS = ("name", "target_quantile", "clip_learning_rate", "record_level",
                        "record_dp")


def default_hospital_threshold(cfg: Mapping[str, Any]) -> int:
    """The fewest survivors a released sum can have with a full cohort: a site signs a survivor
    set only with at least max(t, n//2 + 1) members (privacy/secagg/client.py quorum), t being
    secagg.threshold or a majority of the neighbourhood (>= n//2 + 1 under full SecAgg)."""
    secagg_threshold = cfg["secagg"].get("threshold") or 0
    return max(int(secagg_threshold), sites_per_round(cfg) // 2 + 1)


def _validate_site_dp(cfg: DictConfig | Mapping[str, Any]) -> None:
    privacy = cfg["privacy"]
    _check(cfg["secagg"]["name"] == "on", "secagg", "'on' with privacy=site_dp (each site's "
           "noise share is only a share: without secure aggregation the server would see every "
           "site's update with a fraction of the noise; docs/site_dp.md)", cfg["secagg"]["name"])
    for key in ("target_epsilon", "clip"):
        _check(_is_number(privacy.get(key)) and privacy[key] > 0, f"privacy.{key}",
               "a number > 0", privacy.get(key))
    delta, hospitals = privacy.get("delta"), cfg["num_hospitals"]
    _check(_is_number(delta) and 0 < delta < 1 / hospitals, "privacy.delta",
           f"a number in (0, 1/num_hospitals = {1 / hospitals:.3g}) (hospital-level delta: the "
           "chance the guarantee fails for one of the hospitals)", delta)
    bits = privacy.get("bits", 32)
    _check(_is_int(bits) and 2 <= bits <= 32, "privacy.bits",
           "an integer in [2, 32] (the SecAgg ring is Z_2^32)", bits)
    floor = default_hospital_threshold(cfg)
    threshold = privacy.get("threshold")
    _check(threshold is None or (_is_int(threshold) and 1 <= threshold <= floor),
           "privacy.threshold", f"null or an integer in [1, {floor}] (the fewest survivors "
           "secure aggregation can release a sum of: max(secagg.threshold, sites_per_round//2 "
           "+ 1); sites refuse a plan counting on more)", threshold)
    sigma_b = privacy.get("count_noise_std")
    _check(sigma_b is None or (_is_number(sigma_b) and sigma_b > 0), "privacy.count_noise_std",
           "null (fixed clip) or a number > 0 (adaptive clipping)", sigma_b)
    quantile = privacy.get("target_quantile", 0.5)
    _check(_is_number(quantile) and 0 < quantile < 1, "privacy.target_quantile",
           "a number in (0, 1)", quantile)
    rate = privacy.get("clip_learning_rate", 0.2)
    _check(_is_number(rate) and rate > 0, "privacy.clip_learning_rate", "a number > 0", rate)
    _check(isinstance(privacy.get("secure_noise", False), bool), "privacy.secure_noise",
           "true or false", privacy.get("secure_noise"))
    _check(privacy.get("record_level", "off") in ("off", "dp"), "privacy.record_level",
           "'off' or 'dp' (DP-SGD at each site as well, settings in privacy.record_dp)",
           privacy.get("record_level"))
    _check(cfg["strategy"]["name"] != "fedprox", "strategy", "not fedprox with privacy=site_dp "
           "(the mean is of clipped deltas; use fedavg, fedadam or fedyogi)", "fedprox")
    try:  # the plan itself (model size aside): a target no noise level in the ring reaches
        from privacy.site_dp import plan

        plan(target_epsilon=float(privacy["target_epsilon"]), delta=float(delta),
             clip=float(privacy["clip"]), dim=1, num_sites=int(hospitals),
             sites_per_round=sites_per_round(cfg), threshold=int(threshold or floor),
             rounds=int(cfg["rounds"]), bits=int(bits),
             count_noise_std=None if sigma_b is None else float(sigma_b))
    except ValueError as err:
        raise ConfigError(f"privacy=site_dp cannot be planned: {err}") from err


def _validate_privacy(cfg: DictConfig | Mapping[str, Any]) -> None:
    site_dp = cfg["privacy"]["name"] == "site_dp"
    if site_dp:
        _validate_site_dp(cfg)
    # record_privacy: under site_dp without record_level=dp, {"name": "off"} (nothing to check)
    _validate_record_dp(cfg, record_privacy(cfg), "privacy.record_dp." if site_dp else "privacy.")


def _validate_record_dp(cfg: DictConfig | Mapping[str, Any], privacy: Mapping[str, Any],
                        prefix: str) -> None:
    if privacy["name"] == "off":
        extra = sorted(set(privacy) - {"name"})
        # e.g. `+privacy.noise_multiplier=1` without privacy=dp: the user believes DP is on
        _check(not extra, "privacy", f"privacy=dp for the DP settings {extra} (privacy=off "
               "trains without DP and would ignore them)", "off")
        return
    _check(privacy["name"] == "dp", "privacy", "'off', 'dp' or 'site_dp'", privacy["name"])
    sigma, target = privacy.get("noise_multiplier"), privacy.get("target_epsilon")
    _check((sigma is None) != (target is None), f"{prefix}noise_multiplier / "
           f"{prefix}target_epsilon", "exactly one of the two set", (sigma, target))
    if sigma is not None:
        _check(_is_number(sigma) and sigma > 0, f"{prefix}noise_multiplier", "a number > 0", sigma)
    if target is not None:
        _check(_is_number(target) and target > 0, f"{prefix}target_epsilon", "a number > 0",
               target)
    delta = privacy.get("delta")
    if delta is not None:
        _check(_is_number(delta) and 0 < delta < 1, f"{prefix}delta", "a number in (0, 1)", delta)
    _check(_is_number(privacy["max_grad_norm"]) and privacy["max_grad_norm"] > 0,
           f"{prefix}max_grad_norm", "a number > 0", privacy["max_grad_norm"])
    _check(privacy["accountant"] in ("prv", "rdp"), f"{prefix}accountant", "one of ['prv', 'rdp']",
           privacy["accountant"])
    budget = privacy.get("max_epsilon")
    if budget is not None:
        _check(_is_number(budget) and budget > 0, f"{prefix}max_epsilon", "a number > 0", budget)
    count_noise = privacy.get("count_noise")
    _check(_is_number(count_noise) and count_noise >= 1, f"{prefix}count_noise",
           "a number >= 1 (the std of the noise on a site's released size, in examples; sites "
           "refuse less)", count_noise)
    _check(isinstance(privacy.get("secure_noise", False), bool), f"{prefix}secure_noise",
           "true or false", privacy.get("secure_noise"))
    _check(cfg["strategy"]["name"] != "fedprox", "strategy",
           "not fedprox with privacy=dp (its proximal term is not clipped per sample)", "fedprox")


# ``site.<key>`` (simulation): every simulated site's own settings, as its site.toml would set
# them (client/site.py reads them; client/policy.py enforces them). Never sent to the sites.
SITE_POLICY_KEYS = ("require_dp", "max_epsilon", "delta", "min_noise_multiplier",
                    "max_grad_norm_range", "allowed_tasks", "allowed_models",
                    "secagg_min_threshold", "max_hospital_epsilon", "max_hospital_delta")


def _validate_site_policy(cfg: DictConfig | Mapping[str, Any]) -> None:
    site = cfg.get("site") or {}
    unknown = sorted(set(site) - set(SITE_POLICY_KEYS))
    _check(not unknown, "site", f"keys among {list(SITE_POLICY_KEYS)}", unknown)
    require_dp = site.get("require_dp")
    _check(require_dp is None or isinstance(require_dp, bool), "site.require_dp",
           "true, false or null", require_dp)
    for key in ("max_epsilon", "min_noise_multiplier", "max_hospital_epsilon"):
        value = site.get(key)
        _check(value is None or (_is_number(value) and value > 0), f"site.{key}",
               "a number > 0 or null", value)
    for key in ("delta", "max_hospital_delta"):
        delta = site.get(key)
        _check(delta is None or (_is_number(delta) and 0 < delta < 1), f"site.{key}",
               "a number in (0, 1) or null", delta)
    clip = site.get("max_grad_norm_range")
    _check(clip is None or (isinstance(clip, list | tuple | ListConfig) and len(clip) == 2
                            and all(_is_number(c) for c in clip) and 0 < clip[0] <= clip[1]),
           "site.max_grad_norm_range", "[low, high] with 0 < low <= high, or null", clip)
    for key in ("allowed_tasks", "allowed_models"):
        names = site.get(key)
        _check(names is None or (isinstance(names, list | tuple | ListConfig)
                                 and all(isinstance(n, str) for n in names)),
               f"site.{key}", "a list of names or null", names)
    floor = site.get("secagg_min_threshold")
    _check(floor is None or (_is_int(floor) and floor >= 2), "site.secagg_min_threshold",
           "an integer >= 2 or null", floor)


def site_node_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``site.<key>`` as the node-config entries (dashed keys) of every simulated site, and the
    plugins a simulated site has installed: the run's ``plugins`` and ``simulation.plugins``
    (its synthetic generator runs at the site, on a Ray worker)."""
    entries = {}
    for key, value in (cfg.get("site") or {}).items():
        if value is not None:
            entries[key.replace("_", "-")] = list(value) if isinstance(value, list | tuple) \
                else value
    installed = [*plugin_modules(cfg), *plugin_modules(cfg, "simulation.plugins")]
    if installed:
        entries["plugins"] = list(dict.fromkeys(installed))
    return entries


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return resolve_standardize(resolve_hospital_privacy(plain))


def resolve_hospital_privacy(cfg: dict[str, Any]) -> dict[str, Any]:
    """``privacy=site_dp`` split once into what the rest of medsilo reads: ``privacy`` becomes
    the record-level part (DP-SGD as privacy=dp, or off: the sites, baselines, audit and
    per-site ledgers are unchanged) and ``hospital_privacy`` the hospital-level settings, with
    ``threshold`` resolved (default_hospital_threshold). Idempotent."""
    privacy = cfg.get("privacy")
    if not isinstance(privacy, dict) or privacy.get("name") != "site_dp":
        return cfg
    hospital = {k: v for k, v in privacy.items() if k not in ("record_level", "record_dp")}
    if hospital.get("threshold") is None:
        hospital["threshold"] = default_hospital_threshold(cfg)
    hospital["record_level"] = privacy.get("record_level", "off")
    cfg["privacy"] = dict(record_privacy(cfg))
    cfg["hospital_privacy"] = hospital
    return cfg


def hospital_settings(cfg: Mapping[str, Any]) -> HospitalPrivacySettings | None:
    """What the sites need to compute the hospital-level plan (None without site_dp)."""
    hospital = cfg.get("hospital_privacy")
    if not hospital:
        return None
    sent = {k: v for k, v in hospital.items() if k not in HOSPITAL_SERVER_KEYS}
    return HospitalPrivacySettings.from_dict({**sent, "num_sites": int(cfg["num_hospitals"]),
                                              "sites_per_round": sites_per_round(cfg)})


def resolve_standardize(cfg: dict[str, Any]) -> dict[str, Any]:
    """``task.standardize=auto`` -> ``reference`` under privacy=dp (site statistics would let one
    patient move every other patient's features, which DP-SGD does not cover), ``site``
    otherwise. Resolved here, once, so the sites (they receive ``task`` as resolved), the
    baselines, the pooled evaluation and the report all see the same choice."""
    task = cfg.get("task")
    if not isinstance(task, dict):
        return cfg
    if task.get("standardize") == "auto":
        dp = cfg.get("privacy", {}).get("name", "off") != "off"
        task["standardize"] = "reference" if dp else "site"
    if task.get("reference"):  # floats on the wire: a list sent to a site holds one type
        task["reference"] = {k: [float(x) for x in v] for k, v in task["reference"].items()}
    return cfg


def site_settings(cfg: Mapping[str, Any]) -> RunSettings:
    """What the server sends each site with the global model (privacy/run_settings.py types it,
    privacy/protocol.py encodes it)."""
    # typed as the site will read them: a value of the wrong type is named here already
    train = TrainSettings.from_dict({
        "local_epochs": cfg["local_epochs"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
        "momentum": cfg["momentum"], "optimizer": cfg["optimizer"],
        "class_balance": cfg.get("class_balance", "none"),
        "weight_decay": cfg.get("weight_decay", 0.0)})
    privacy = PrivacySettings.from_dict(cfg["privacy"])
    return RunSettings(task=dict(cfg["task"]), model=dict(cfg["model"]), train=train,
                       privacy=privacy, seed=int(cfg["seed"]),
                       rounds=int(cfg["rounds"]),  # a DP site plans σ for the whole run
                       plugins=plugin_modules(cfg),  # never simulation.plugins
                       hospital_privacy=hospital_settings(cfg))


# ``flwr run --run-config`` keys whose value is a list, given as names separated by commas
LIST_RUN_CONFIG_KEYS = ("plugins", "hydra.searchpath")


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """``flwr run --run-config 'rounds=3 strategy="fedadam"'`` -> Hydra overrides."""
    overrides = []
    for key, value in sorted(run_config.items()):
        if value == "":
            value = "null"
        elif key in LIST_RUN_CONFIG_KEYS and isinstance(value, str):
            # run config values cannot be lists: 'plugins="pkg_a.plugin,pkg_b"' -> a list
            value = "[" + ",".join(v for v in re.split(r"[,\s\[\]]+", value) if v) + "]"
            if key == "plugins":  # ++: set whether or not conf/config.yaml declares the key
                key = "++plugins"
        elif isinstance(value, str) and any(c in value for c in " ,=[]{}'\"/\\:"):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        overrides.append(f"{key}={value}")
    return overrides


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with overrides by Hydra's compose API, not validated
    (simulations/overrides.py composes with it to name a mistake Hydra refused)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/config.yaml`` with overrides, validate it, return a plain dict."""
    cfg = compose_config(overrides)
    validate(cfg)
    return to_dict(cfg)
