"""Task lookup for experiments: ``programs.registry`` when it is there, else the built-in default task.

Why a seam: experiment files name their task (``task: last_digit`` or ``{name: ..., options: {...}}``); the
registry (``programs.registry.task_from_spec``) resolves it. This module turns the registry's errors into one
error class the config validator can point at a YAML line, and keeps ``last_digit`` working on a checkout
without the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TaskLookupError(ValueError):
    """An unknown task, or options the task does not take (``kind`` is ``"name"`` or ``"options"``)."""

    def __init__(self, message: str, kind: str = "name") -> None:
        super().__init__(message)
        self.kind = kind


def resolve_task(spec: str | Mapping[str, Any]) -> Any:
    """The task object for an experiment's ``task:`` value.

    The object has ``name``, ``programs`` (name -> factory), ``default_program``, ``load(split, n, seed)``,
    ``program(name=None)``, ``rubric()``, ``gold_metric`` and ``options``.

    Raises:
        TaskLookupError: unknown task name or bad options (the message lists what is available).
    """
    try:
        from programs import registry
    except ImportError:  # a checkout without the task registry: only the default task
        return _fallback(spec)
    try:
        return registry.task_from_spec(dict(spec) if isinstance(spec, Mapping) else spec)
    except registry.UnknownTaskError as exc:
        raise TaskLookupError(str(exc), "name") from None
    except registry.TaskOptionError as exc:
        raise TaskLookupError(str(exc), "options") from None
    except registry.TaskError as exc:
        raise TaskLookupError(str(exc), "options") from None


def _fallback(spec: str | Mapping[str, Any]) -> Any:
    from dataclasses import dataclass, field

    from programs.tasks import last_digit

    name = spec if isinstance(spec, str) else str(spec.get("name"))
    options = {} if isinstance(spec, str) else dict(spec.get("options") or {})
    if name != "last_digit":
        raise TaskLookupError(f"unknown task {name!r}; without programs.registry the only task is 'last_digit'")
    if options:
        raise TaskLookupError(f"task 'last_digit' takes no options here, got {sorted(options)}", "options")

    @dataclass(frozen=True)
    class _Task:
        name: str = "last_digit"
        programs: dict = field(default_factory=lambda: {"predict": last_digit.predict_program,
                                                        "cot": last_digit.cot_program})
        default_program: str = "predict"
        gold_metric: Any = last_digit.correct
        options: dict = field(default_factory=dict)

        def load(self, split: str, n: int, seed: int = 0):
            return last_digit.load(split, n, seed)

        def program(self, name: str | None = None):
            return self.programs[name or self.default_program]()

        def rubric(self):
            from metrics import ExactMatch, FormatValidity, Rubric

            return Rubric([ExactMatch("answer", name="correct"), FormatValidity(["answer"])],
                          weights={"correct": 3, "format": 1}, gates={"correct": "format"}, name="last_digit")

    return _Task()
