"""The run settings the server sends with every train/evaluate message and each site reads:
one typed definition for both sides.

``server/settings.py`` builds a :class:`RunSettings` from the composed config; ``privacy/
protocol.py`` flattens it into the message's ConfigRecord and decodes it at the site, checking
every value against its field's type (a wrong or missing value names the key). ``task`` and
``model`` stay mappings: each task and model reads its own keys (client/tasks, models/).
``plugins`` names the modules of the run's own code (a model or task outside medsilo,
docs/extending.md): a site imports one only if its own site configuration lists it.
"""

from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation at a site (conf/config.yaml: local_epochs, batch_size, lr, ...)."""

    local_epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    optimizer: str = "sgd"
    class_balance: str = "none"
    weight_decay: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSettings:
        return _typed(cls, values, "train")


@dataclass(frozen=True)
class PrivacySettings:
    """What the server proposes for DP-SGD (conf/privacy/*.yaml); the site's policy decides
    (client/policy.py)."""

    name: str = "off"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    accountant: str = "prv"
    max_epsilon: float | None = None
    secure_noise: bool = False
    count_noise: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PrivacySettings:
        """Typed and checked; ``None`` values count as unset."""
        return _typed(cls, {k: v for k, v in values.items() if v is not None}, "privacy")


@dataclass(frozen=True)
class HospitalPrivacySettings:
    """Hospital-level DP with distributed noise (``privacy=site_dp``, conf/privacy/site_dp.yaml;
    docs/site_dp.md): the PUBLIC inputs from which every site computes the noise plan itself
    (client/site_dp.py), never a noise level chosen by the server. Together with the run's
    ``rounds`` and the model's size they fix ``privacy.site_dp.plan(...)``."""

    target_epsilon: float
    delta: float
    clip: float  # L2 bound C on a site's model delta (adaptive clipping: the first round's)
    num_sites: int  # N, the federation
    sites_per_round: int  # n, the most sites summed in a round
    threshold: int  # t, the fewest survivors any released sum has (SecAgg's global floor)
    bits: int = 32  # ring Z_2^bits (<= 32, the SecAgg ring)
    count_noise_std: float | None = None  # sigma_b: adaptive clipping on (Andrew et al. 2021)
    # simulation: noise and rounding from the OS instead of the run's seed (deployed sites
    # always draw them from the OS: client/site_dp.py)
    secure_noise: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HospitalPrivacySettings:
        return _typed(cls, {k: v for k, v in values.items() if v is not None},
                      "hospital_privacy")

    def plan(self, *, rounds: int, dim: int) -> Any:
        """The :class:`privacy.site_dp.SiteDPPlan` these settings fix for a model of ``dim``
        coordinates over ``rounds``: the same at the server and at every site (a
        deterministic function of public values). No amplification by sampling: the server
        samples and sees the cohort (docs/site_dp.md)."""
        from privacy.site_dp import plan  # numpy/scipy: only where the plan is needed

        return plan(target_epsilon=self.target_epsilon, delta=self.delta, clip=self.clip,
                    dim=dim, num_sites=self.num_sites, sites_per_round=self.sites_per_round,
                    threshold=self.threshold, rounds=rounds, bits=self.bits,
                    count_noise_std=self.count_noise_std, amplification="none")


@dataclass(frozen=True)
class RunSettings:
    """Everything a site needs to train or evaluate the global model of one round."""

    task: Mapping[str, Any]
    model: Mapping[str, Any]
    train: TrainSettings
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    seed: int = 0
    rounds: int = 1  # planned rounds: a DP site plans σ for all of them
    server_round: int = 0  # set by Flower's strategies in every message
    # modules registering the run's model/task (``plugins`` in config); a site refuses a run
    # needing one its own configuration does not list (client/site.py), never imports it
    plugins: tuple[str, ...] = ()
    # privacy=site_dp: hospital-level DP inside secure aggregation (``privacy`` above is then
    # the record-level part: DP-SGD at each site, or off); None: no hospital-level DP
    hospital_privacy: HospitalPrivacySettings | None = None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (privacy/protocol.py flattens them into the ConfigRecord)."""
        values = {"task": dict(self.task), "model": dict(self.model),
                  "train": dataclasses.asdict(self.train), "privacy": self.privacy.as_dict(),
                  "seed": self.seed, "rounds": self.rounds}
        if self.plugins:  # absent without plugins: the wire format of a run without them
            values["plugins"] = list(self.plugins)
        if self.hospital_privacy is not None:  # absent otherwise, as plugins
            values["hospital_privacy"] = self.hospital_privacy.as_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], server_round: int = 0) -> RunSettings:
        """Inverse of :meth:`to_dict`, every value checked against its field's type."""
        return cls(
            task=_mapping(values, "task"), model=_mapping(values, "model"),
            train=TrainSettings.from_dict(_mapping(values, "train")),
            privacy=PrivacySettings.from_dict(_mapping(values, "privacy")),
            seed=_value(int, values.get("seed", 0), "seed"),
            rounds=_value(int, values.get("rounds", 1), "rounds"),
            server_round=server_round,
            plugins=module_names(values.get("plugins", ()), "plugins"),
            hospital_privacy=(HospitalPrivacySettings.from_dict(
                _mapping(values, "hospital_privacy")) if "hospital_privacy" in values else None))


class RunSettingsError(ValueError):
    """A run setting of the wrong type or missing; the message names the key."""


def is_module_name(name: Any) -> bool:
    """``name`` is a dotted Python module name (``my_package.medsilo_plugin``): something
    ``import`` can name, never a path or code."""
    return isinstance(name, str) and all(part.isidentifier() and not keyword.iskeyword(part)
                                         for part in name.split("."))


def module_names(value: Any, key: str) -> tuple[str, ...]:
    """A list of distinct module names (``plugins``), or :class:`RunSettingsError` naming
    ``key`` and the first entry that is not one."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise RunSettingsError(f"run setting '{key}' must be a list of module names, got "
                               f"{value!r}")
    for index, name in enumerate(value):
        if not is_module_name(name):
            raise RunSettingsError(f"run setting '{key}[{index}]' must be a dotted module name "
                                   f"such as 'my_package.medsilo_plugin', got {name!r}")
    if len(set(value)) != len(value):
        raise RunSettingsError(f"run setting '{key}' names a module twice: {list(value)}")
    return tuple(value)


def _mapping(values: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = values.get(key)
    if not isinstance(value, Mapping):
        raise RunSettingsError(f"run setting '{key}' must be a group of settings, got "
                               f"{type(value).__name__}")
    return value


def _value(kind: Any, value: Any, key: str) -> Any:
    """``value`` if it fits ``kind`` (int, float, str, bool, or ``X | None``), ints as floats."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise RunSettingsError(f"run setting '{key}' must be {names}, got {value!r}")


def _typed(cls: Any, values: Mapping[str, Any], group: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise RunSettingsError(f"unknown run setting(s) {[f'{group}.{k}' for k in unknown]}; "
                               f"expected some of {sorted(hints)}")
    kwargs = {}
    for item in dataclasses.fields(cls):
        if item.name in values:
            kwargs[item.name] = _value(hints[item.name], values[item.name],
                                       f"{group}.{item.name}")
        elif item.default is dataclasses.MISSING:
            raise RunSettingsError(f"run setting '{group}.{item.name}' is missing")
    return cls(**kwargs)
