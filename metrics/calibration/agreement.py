"""How well a rubric's totals agree with labels: concordance (ROC AUC / Harrell's C) and accuracy at a threshold.

Why a module of its own: agreement is the one yardstick of calibration. The fit chooses its L2 strength and gates by
cross-validated concordance, and a :class:`~metrics.calibration.rubric_file.Calibration` reports agreement before and
after on held-out labels; both must measure the same thing. Concordance is, over every pair of labels where one is
better than the other, the fraction the rubric orders the same way (ties count half).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metrics.calibration.labels import Label

__all__ = ["Agreement", "agreement"]


@dataclass(frozen=True)
class Agreement:
    """How well a rubric's totals agree with a set of labels.

    Attributes:
        concordance: Over pairs of labels where one is better, the fraction the totals order the same way (ties
            count half): the ROC AUC for pass/fail labels. 0.5 is chance, 1.0 perfect.
        accuracy: Fraction of labels on the right side of ``threshold`` (a pass is a verdict >= 0.5).
        threshold: The total from which the rubric calls a rollout a pass (chosen on the fit labels).
        n: Number of labels measured.
    """

    concordance: float
    accuracy: float
    threshold: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for JSON and MLflow metrics)."""
        return {"concordance": self.concordance, "accuracy": self.accuracy, "threshold": self.threshold,
                "n": self.n}


def concordance(scores: np.ndarray, y: np.ndarray) -> float:
    """Harrell's C of ``scores`` against ``y`` (the AUC for 0/1 ``y``); NaN when no pair differs in ``y``."""
    s = np.round(np.asarray(scores, float), 12)
    y = np.asarray(y, float)
    right = ties = pairs = 0.0
    for start in range(0, len(y), 1024):  # rows in blocks: memory stays O(1024 n) for many labels
        better = y[start:start + 1024, None] > y[None, :]
        ds = s[start:start + 1024, None] - s[None, :]
        pairs += better.sum()
        right += ((ds > 0) & better).sum()
        ties += ((ds == 0) & better).sum()
    return float((right + 0.5 * ties) / pairs) if pairs else math.nan


def best_threshold(scores: np.ndarray, passed: np.ndarray) -> float:
    scores = np.round(scores, 12)
    levels = np.unique(scores)
    cuts = np.concatenate([levels[:1], (levels[:-1] + levels[1:]) / 2])  # "nothing passes" is not a rubric
    acc = np.array([((scores >= c) == passed).mean() for c in cuts])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float(min(1.0, max(0.0, cuts[best[len(best) // 2]])))


def agreement(totals: Sequence[float], labels: Sequence[Label], threshold: float = 0.5) -> Agreement:
    """Agreement of rubric totals with labels: concordance (AUC) and accuracy at ``threshold``.

    Why: one number to compare rubrics on the same labels, with no threshold to tune for the concordance.

    Example:
        >>> labels = [Label("a", {}, "pass"), Label("b", {}, "fail"), Label("c", {}, "fail")]
        >>> agreement([0.9, 0.2, 0.9], labels)
        Agreement(concordance=0.75, accuracy=0.6666666666666666, threshold=0.5, n=3)
    """
    totals = np.asarray(totals, float)
    y = np.array([lab.value for lab in labels], float)
    passed = y >= 0.5
    return Agreement(concordance(totals, y), float(((totals >= threshold) == passed).mean()), float(threshold),
                     len(labels))
