"""Site generators by task name: ``conf/task/<name>.yaml``'s ``name`` is the key, as for
``client.tasks.get_task``.

A task of your own registers its generator here from a module of its package that only a
simulation imports (``simulation.plugins``; a hospital never runs a generator), docs/extending.md.
"""

from __future__ import annotations

from simulations.synthetic.base import SiteGenerator

_GENERATORS: dict[str, SiteGenerator] = {}


def register_generator(cls: type[SiteGenerator]) -> type[SiteGenerator]:
    if cls.name in _GENERATORS:
        first = type(_GENERATORS[cls.name])
        raise ValueError(f"site generator {cls.name!r} is registered twice (by "
                         f"{first.__module__}.{first.__qualname__} and by {cls.__module__}."
                         f"{cls.__qualname__})")
    _GENERATORS[cls.name] = cls()
    return cls


def registered_generators() -> list[str]:
    return sorted(_GENERATORS)


def get_generator(name: str) -> SiteGenerator:
    if name not in _GENERATORS:
        raise ValueError(f"no site generator for task {name!r}; expected one of "
                         f"{registered_generators()} (a task of your own: name the module "
                         "registering its generator in simulation.plugins, or give its sites' "
                         "folders as data.root; docs/extending.md)")
    return _GENERATORS[name]
