"""One safe call of a user's metric: call it, normalise its answer to a :class:`~metrics.base.Score`, and name the
example when it fails.

Why this module exists: the valset evaluation (``optimizers.evaluate``) and the weight stage's rewards
(``rl.rollouts``) both call the user's metric on examples, and a broken metric must stop both the same way: with
one :class:`~metrics.errors.MetricError` that says what the metric did and on which example, never a quiet 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import dspy

from metrics.base import Score, short_repr
from metrics.errors import MetricError

__all__ = ["call_metric"]


def call_metric(metric: Callable[..., Any], example: Any, prediction: Any, trace: Any = None) -> Score:
    """Call ``metric`` on one (example, prediction) and return its answer as a :class:`~metrics.base.Score`.

    A rubric (anything with a ``reward(example, prediction, trace)`` method) gets the trace; a plain DSPy metric
    gets ``trace=None``, because DSPy metrics return a pass/fail bool when given a trace. The answer may be a
    float/bool, a ``dspy.Prediction(score=, feedback=)`` or a rubric ``Score`` (anything with ``value`` and
    ``components``).

    Raises:
        MetricError: the metric raised, or returned something that is not a finite number; the message names the
            example's inputs.

    Example:
        >>> call_metric(lambda example, pred, trace=None: example["answer"] == pred["answer"],
        ...             {"answer": "4"}, {"answer": "4"})
        Score(value=1.0, components={}, feedback='')
        >>> call_metric(lambda example, pred, trace=None: float("nan"), {"question": "2+2?"}, {})
        Traceback (most recent call last):
        ...
        metrics.errors.MetricError: the metric returned nan on example {question='2+2?'}; it must return a finite number
    """
    try:
        reward = getattr(metric, "reward", None)
        out = reward(example, prediction, trace) if callable(reward) else metric(example, prediction, None)
    except Exception as exc:  # noqa: BLE001 - re-raised with the example named
        raise MetricError(f"the metric raised {type(exc).__name__}: {exc} on example {short_repr(example)}") from exc
    components: dict[str, float] = {}
    feedback = ""
    if hasattr(out, "value") and hasattr(out, "components"):
        value, components, feedback = out.value, dict(out.components), getattr(out, "feedback", "") or ""
    elif isinstance(out, dspy.Prediction):
        value, feedback = out.get("score"), out.get("feedback") or ""
    else:
        value = out
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise MetricError(f"the metric returned {out!r:.80}, not a number, on example {short_repr(example)}") from exc
    if not math.isfinite(value):
        raise MetricError(f"the metric returned {value} on example {short_repr(example)}; it must return a finite "
                          "number")
    return Score(value, components, str(feedback))
