"""Site generators by task name: ``conf/task/<name>.yaml``'s ``name`` is the key, as for
``client.tasks.get_task``."""

from __future__ import annotations

from simulations.synthetic.base import SiteGenerator

_GENERATORS: dict[str, SiteGenerator] = {}


def register_generator(cls: type[SiteGenerator]) -> type[SiteGenerator]:
    if cls.name in _GENERATORS:
        raise ValueError(f"site generator {cls.name!r} is registered twice")
    _GENERATORS[cls.name] = cls()
    return cls


def registered_generators() -> list[str]:
    return sorted(_GENERATORS)


def get_generator(name: str) -> SiteGenerator:
    if name not in _GENERATORS:
        raise ValueError(f"no site generator for task {name!r}; expected one of "
                         f"{registered_generators()}")
    return _GENERATORS[name]
