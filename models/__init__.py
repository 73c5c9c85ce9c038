"""Model families, registered by name (see ``models/registry.py``).

Every module in this package registers its builders on import; a new family is a new file.
"""

import importlib
import pkgutil

from models.registry import build_model, register_model, registered_models

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["build_model", "register_model", "registered_models"]
