"""Tasks by name: ``conf/task/<name>.yaml`` has ``name: <name>`` registered here."""

from __future__ import annotations

from client.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls()
    return cls


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {registered_tasks()}")
    return _TASKS[name]


