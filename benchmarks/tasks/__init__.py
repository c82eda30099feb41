"""Tasks, one module each, registered in ``benchmarks.tasks.registry`` (see its docstring)."""

from benchmarks.tasks import dialogue, sentiment  # noqa: F401 - they register
from benchmarks.tasks.registry import TASKS, Task, register_task, task_gold, task_of  # noqa: F401
