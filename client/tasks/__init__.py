"""Clinical tasks, registered by name. Each reads one site's files in its real format (the
synthetic generators that write such files live in ``simulations/synthetic/``).

Every module in this package registers its task on import; a new task is a new file.
"""

import importlib
import pkgutil

from client.tasks.base import DataError, SiteData, Task
from client.tasks.registry import get_task, register_task, registered_tasks

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DataError", "SiteData", "Task",
    "get_task", "register_task", "registered_tasks",
]
