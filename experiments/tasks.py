"""Task lookup for experiments: an experiment's ``task:`` value resolved by ``programs.registry``.

Why a seam: experiment files name their task (``task: last_digit`` or ``{name: ..., options: {...}}``); the
registry (``programs.registry.task_from_spec``) resolves it. This module turns the registry's errors into one
error class the config validator can point at a YAML line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from programs.registry import Task


class TaskLookupError(ValueError):
    """An unknown task, or options the task does not take (``kind`` is ``"name"`` or ``"options"``)."""

    def __init__(self, message: str, kind: str = "name") -> None:
        super().__init__(message)
        self.kind = kind


def resolve_task(spec: str | Mapping[str, Any]) -> Task:
    """The registry's :class:`~programs.registry.Task` for an experiment's ``task:`` value.

    Raises:
        TaskLookupError: unknown task name or bad options (the message lists what is available).
    """
    from programs import registry  # imported here: it imports dspy, which validating a file's other keys does not need

    try:
        return registry.task_from_spec(dict(spec) if isinstance(spec, Mapping) else spec)
    except registry.UnknownTaskError as exc:
        raise TaskLookupError(str(exc), "name") from None
    except registry.TaskError as exc:  # TaskOptionError and the other problems of a task's options
        raise TaskLookupError(str(exc), "options") from None
