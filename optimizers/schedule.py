"""Schedules: the order of prompt and weight stages, written as a string like ``"p -> w -> p"``.

Why a string: BetterTogether (arXiv 2407.10930) found no single order of prompt and weight optimization wins on
every task, so the order is a hyperparameter. A short string is what a user types, what an experiment YAML
holds, what Optuna samples among, and what MLflow tags runs with.

The letters are the registered stage kinds (:mod:`optimizers.stages`): ``p`` prompt optimization, ``w`` GRPO on the
LoRA adapter, ``s`` fine-tune on the program's own successful traces, and any kind added with
:func:`optimizers.stages.register`.

Example:
    >>> parse_schedule("p -> w -> p")
    ('p', 'w', 'p')
    >>> arm_of(parse_schedule("w"))
    'rl-only'
"""

from __future__ import annotations

import re

from optimizers.stages import KINDS


class ScheduleError(ValueError):
    """A schedule string that cannot be parsed; the message says what is wrong and what is allowed."""


def parse_schedule(schedule: str) -> tuple[str, ...]:
    """Split ``"p -> w -> p"`` into stage letters, validating each.

    Raises:
        ScheduleError: empty schedule, an empty step (``"p -> -> w"``), or an unknown stage letter.
    """
    if not isinstance(schedule, str):
        raise ScheduleError(f"a schedule is a string like 'p -> w -> p', got {type(schedule).__name__}")
    if not schedule.strip():
        raise ScheduleError("the schedule is empty; write stages joined by '->', e.g. 'p -> w -> p'")
    parts = [part.strip().lower() for part in re.split(r"->", schedule)]
    stages = []
    for i, part in enumerate(parts):
        if not part:
            raise ScheduleError(f"step {i + 1} of schedule {schedule!r} is empty; write stages joined by '->'")
        if part not in KINDS:
            allowed = ", ".join(f"'{k}' ({kind.title})" for k, kind in KINDS.items())
            raise ScheduleError(f"unknown stage {part!r} at step {i + 1} of schedule {schedule!r}; stages are {allowed}")
        stages.append(part)
    return tuple(stages)


def format_schedule(stages: tuple[str, ...] | list[str]) -> str:
    """The canonical spelling, ``"p -> w -> p"``."""
    return " -> ".join(stages)


def arm_of(stages: tuple[str, ...] | list[str]) -> str:
    """The comparison arm a schedule belongs to: ``prompt-only``, ``rl-only`` (weights only) or ``joint``."""
    kinds = {"weights" if KINDS[s].trains_weights else "prompt" for s in stages}
    if kinds == {"prompt"}:
        return "prompt-only"
    if kinds == {"weights"}:
        return "rl-only"
    return "joint"
