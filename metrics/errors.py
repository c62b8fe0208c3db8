"""Exceptions and warnings raised by :mod:`metrics`.

Why this module exists: callers (the optimizers, the GRPO loop, the CLI) need to tell a broken
metric apart from a broken program or a broken LM, and to catch "stop, the reward is being
hacked" specifically. Every exception here derives from :class:`MetricError`, and every message
says what to do next. :class:`MetricError` is also the one error every consumer raises when a metric fails on an
example (the prompt stages' evaluation and the weight stages' rewards alike, see :func:`metrics.call_metric`), so a
caller catches one type whichever stage found the broken metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metrics.base import GuardEvent

__all__ = [
    "ComponentError",
    "JudgeError",
    "MetricError",
    "RewardHackingError",
    "RewardHackingWarning",
    "RubricConfigError",
]


class MetricError(ValueError):
    """A metric failed on an example (raised, or returned a non-number or a non-finite value), and the base class of
    every error raised by :mod:`metrics`.

    A ``ValueError`` because a broken metric is a bad value handed to cotune: the CLI reports it in one line.
    """


class RubricConfigError(MetricError):
    """A rubric, component or guard was built with invalid arguments (bad weights, unknown gate, ...)."""


class ComponentError(MetricError):
    """A rubric component raised, returned NaN, or returned a value outside ``[0, 1]``.

    Attributes:
        component: Name of the failing component.
        example: Short repr of the example's inputs the component failed on.
    """

    def __init__(self, component: str, example: str, problem: str) -> None:
        self.component = component
        self.example = example
        self.problem = problem
        super().__init__(
            f"Rubric component {component!r} failed on example {example}: {problem}. "
            "Fix the component, or build the Rubric with on_error='zero' to score such failures 0 "
            "and count them in rubric.error_counts."
        )

    def __reduce__(self):  # keep the exception picklable across process pools
        return (type(self), (self.component, self.example, self.problem))


class JudgeError(MetricError):
    """An :class:`~metrics.judge.LMJudge` has no LM or could not read a score from the LM's answer."""


class RewardHackingError(MetricError):
    """Raised by a guard built with ``action="stop"`` when it detects reward hacking.

    Attributes:
        event: The :class:`~metrics.guards.GuardEvent` that triggered the stop (already recorded).
    """

    def __init__(self, event: GuardEvent) -> None:
        self.event = event
        super().__init__(
            f"{event.message} Stopping (action='stop'): inspect the rollouts of stage/step {event.step!r}, "
            "tighten the rubric (gates, format or length components), or build the guard with action='warn'."
        )

    def __reduce__(self):
        return (type(self), (self.event,))


class RewardHackingWarning(UserWarning):
    """Warning category used by guards built with ``action="warn"``."""
