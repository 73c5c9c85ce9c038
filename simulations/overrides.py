"""The command line's ``key=value`` overrides, checked against ``conf/``.

Hydra answers a typo (``roudns=3``, ``task=tabluar``) with its own dump (the config search
path, "To append to your config use +roudns=3", a hint about HYDRA_FULL_ERROR) and exit
status 1, after which nothing says what was probably meant. :func:`check_overrides` composes
the same config with Hydra's compose API and turns each kind of mistake into one
:class:`~server.settings.ConfigError` line with a did-you-mean drawn from the config's own
keys (nested ones included) or a group's choices (issue 19), and runs our validation.
``simulations/run.py`` calls it once Hydra has refused a command line (Hydra's dump held
back): a line that composes is not composed a third time before a run. Hydra and OmegaConf
only: no torch, Flower or Ray (tests/test_startup.py).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from typing import Any

from server.settings import CONF_DIR, ConfigError, validate
from server.settings import compose_config as _compose

# the closest candidate must be at least this similar (difflib ratio) to be suggested
SUGGEST_CUTOFF = 0.6


def check_overrides(overrides: Sequence[str]) -> None:
    """Raise :class:`ConfigError` (one line) if ``overrides`` do not compose into a valid config.
    ``hydra.*`` overrides are Hydra's own (run directory, logging) and are left to it."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    # hydra.searchpath stays: a plugin's config groups (pkg://my_package.conf) live there
    ours = [o for o in overrides if _key(o) == "hydra.searchpath"
            or (not _key(o).startswith(("hydra.", "hydra/")) and _key(o) != "hydra")]
    try:
        cfg = _compose(ours)
    except MissingConfigException as err:  # task=tabluar: a group has no such option
        group, _, value = (err.missing_cfg_file or "").partition("/")
        raise ConfigError(_unknown_choice(group, value, list(err.options or []))) from None
    except OverrideParseException as err:  # rounds=[ : Hydra's grammar
        raise ConfigError(f"could not read the override {_offending(ours)}: "
                          f"{_first_line(err)} (Hydra's override grammar: key=value, "
                          "lists as key=[a,b], strings with spaces quoted)") from None
    except ConfigCompositionException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
            raise ConfigError(_unknown_key(str(cause.full_key), ours)) from None
        raise ConfigError("; ".join(line.strip() for line in str(err).splitlines()
                                    if line.strip())) from None
    validate(cfg)


def _unknown_choice(group: str, value: str, options: list[str]) -> str:
    guess = difflib.get_close_matches(value, options, n=1, cutoff=SUGGEST_CUTOFF)
    return (f"unknown {group} {value!r}" + (f"; did you mean {guess[0]!r}?" if guess else "")
            + f" ({group} is one of: {', '.join(options)})")


def _unknown_key(key: str, overrides: Sequence[str]) -> str:
    """``unknown config key 'roudns'; did you mean 'rounds'?``, or which group choice has it."""
    choices = [o for o in overrides if _key(o) != key and "." not in _key(o)
               and not _key(o).startswith(("+", "~"))]
    try:  # the config the user asked for, without the unknown key: its keys are the candidates
        cfg = _compose(choices)
    except Exception:  # another mistake among the choices: suggest from the defaults
        cfg = _compose([])
    group = key.split(".", 1)[0]
    chosen = _choice(cfg, group)
    having = []
    for option in _group_options(group):  # privacy.accountant with privacy=off
        if option == chosen:
            continue
        try:
            other = _compose([*choices, f"{group}={option}"])
        except Exception:
            continue
        if key in set(_dotted_keys(_container(other))):
            having.append(f"{group}={option}")
    if having:
        return (f"unknown config key {key!r}: it exists only with {' or '.join(having)} "
                f"(this run has {group}={chosen})")
    guess = difflib.get_close_matches(key, list(_dotted_keys(_container(cfg))), n=1,
                                      cutoff=SUGGEST_CUTOFF)
    if guess:
        return f"unknown config key {key!r}; did you mean {guess[0]!r}?"
    return (f"unknown config key {key!r} (`python -m simulations.run --cfg job` lists the "
            f"keys; +{key}=VALUE adds a new one)")


def _choice(cfg, group: str) -> str | None:
    """The option chosen for a config group (its ``name`` key), if ``group`` is one."""
    node = cfg.get(group)
    return node.get("name") if hasattr(node, "get") else None


def _group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _container(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in tree.items():
        key = f"{prefix}{name}"
        yield key
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{key}.")


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _offending(overrides: Sequence[str]) -> str:
    """The first override Hydra's grammar rejects, quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            return repr(override)
    return "on the command line"
