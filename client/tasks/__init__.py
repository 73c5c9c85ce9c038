"""Clinical tasks, registered by name. Each reads one site's files and can write synthetic ones."""

from client.tasks.base import DataError, SiteData, Task
from client.tasks.registry import get_task, register_task, registered_tasks

# Importing the task modules registers them.
from client.tasks import images  # noqa: E402,F401

__all__ = ["DataError", "SiteData", "Task", "get_task", "register_task", "registered_tasks"]
