"""Synthetic hospitals and pooled-dataset partitions, one module per clinical task, each
registered by the task's name (``get_generator(name)``). Simulation only: ``client/`` (what runs
at a hospital) never imports this package.

Every module in this package registers its generator on import; a new task is a new file.
"""

import importlib
import pkgutil

from simulations.synthetic.base import PooledRecords, SiteGenerator, SiteProfile
from simulations.synthetic.registry import (
    get_generator,
    register_generator,
    registered_generators,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PooledRecords", "SiteGenerator", "SiteProfile",
    "get_generator", "register_generator", "registered_generators",
]
