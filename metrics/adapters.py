"""Adapters that present one :class:`~metrics.rubric.Rubric` under each consumer's metric signature.

Why this module exists: DSPy optimizers, DSPy bootstrapping, GEPA and the GRPO loop each call a metric
differently (float; bool when a trace is given; ``dspy.Prediction(score, feedback)`` with five
arguments; a per-rollout :class:`~metrics.base.Score`). These classes are small picklable callables so
the same rubric can be handed to any of them, in threads or in process pools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import dspy

if TYPE_CHECKING:
    from metrics.base import Score

__all__ = ["DspyMetric", "GepaMetric"]


class _Scorer(Protocol):
    """What an adapter wraps: a :class:`~metrics.rubric.Rubric` (a name and ``(example, pred, trace) -> Score``).

    A protocol rather than ``Rubric`` itself: ``metrics.rubric`` imports this module (``Rubric.as_dspy_metric``), so
    naming ``Rubric`` here would make the two modules import each other.
    """

    name: str

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Score:
        ...


class DspyMetric:
    """A rubric as a DSPy metric ``(example, pred, trace=None)``.

    Returns the rubric's value (float) when ``trace is None`` (evaluation, MIPRO scoring), and
    ``bool(value >= threshold)`` when a trace is passed (bootstrapping keeps a demo only on ``True``).

    Example:
        >>> from metrics import ExactMatch, Rubric
        >>> metric = Rubric([ExactMatch("answer")]).as_dspy_metric(threshold=1.0)
        >>> metric({"answer": "4"}, {"answer": "4"}), metric({"answer": "4"}, {"answer": "5"}, trace=[])
        (1.0, False)
    """

    def __init__(self, rubric: _Scorer, threshold: float = 1.0) -> None:
        self.rubric = rubric
        self.threshold = float(threshold)
        self.__name__ = rubric.name

    def __call__(self, example: Any, pred: Any, trace: Any = None) -> float | bool:
        value = self.rubric(example, pred, trace).value
        if trace is None:
            return value
        return bool(value >= self.threshold - 1e-9)  # float sums must not turn a perfect score into False

    def __repr__(self) -> str:
        return f"DspyMetric({self.rubric!r}, threshold={self.threshold})"


class GepaMetric:
    """A rubric as GEPA's feedback metric ``(gold, pred, trace=None, pred_name=None, pred_trace=None)``.

    Returns ``dspy.Prediction(score=float, feedback=str)``; the feedback is the rubric's combined
    component feedback (which components failed and why). It is program-level feedback, also returned
    when GEPA asks about a single predictor (``pred_name``).

    Example:
        >>> from metrics import ExactMatch, Rubric
        >>> out = Rubric([ExactMatch("answer")]).as_gepa_metric()({"answer": "4"}, {"answer": "5"})
        >>> out.score, "expected '4', got '5'" in out.feedback
        (0.0, True)
    """

    def __init__(self, rubric: _Scorer) -> None:
        self.rubric = rubric
        self.__name__ = rubric.name

    def __call__(self, gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None,
                 pred_trace: Any = None) -> dspy.Prediction:
        score = self.rubric(gold, pred, trace)
        return dspy.Prediction(score=score.value, feedback=score.feedback)

    def __repr__(self) -> str:
        return f"GepaMetric({self.rubric!r})"
