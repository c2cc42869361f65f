"""Tasks: how a trained run is evaluated, which metrics and plots it writes, what it exports.

A task is a :class:`histokd.tasks.base.Task` subclass registered in
:data:`histokd.registry.TASKS` under the name a run config gives as ``task``; the runner
and ``histokd eval`` only look it up.
"""

from histokd.tasks.base import Task, get_task
from histokd.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask", "Task", "get_task"]
