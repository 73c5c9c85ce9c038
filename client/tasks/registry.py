"""Tasks by name: ``conf/task/<name>.yaml`` has ``name: <name>`` registered here.

A task of your own (a data format outside medsilo) registers here from your package with
``@register_task`` on a :class:`~client.tasks.base.Task` subclass; the run names that module in
``plugins`` and each site imports it only if it lists it too (docs/extending.md).
"""

from __future__ import annotations

from client.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} has no name: a task class sets "
                         "name = '<name>' (the name: of its conf/task/<name>.yaml)")
    if name in _TASKS:
        first = type(_TASKS[name])
        raise ValueError(f"task {name!r} is registered twice (by {first.__module__}."
                         f"{first.__qualname__} and by {cls.__module__}.{cls.__qualname__}); "
                         "give the new task a name of its own")
    _TASKS[name] = cls()
    return cls


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {registered_tasks()} (a task "
                         "of your own registers when its module is imported: name it in "
                         "plugins, docs/extending.md)")
    return _TASKS[name]


