"""A judged rollout (:class:`Label`): the rubric's component values for it, and what a person or a gold answer said.

Why a module of its own: a label is the input of every other part of calibration (the fit, the agreement measure,
the criteria proposer, labels as gold, corrections), and reading one back from an MLflow assessment must refuse a
bad verdict or source right away, with a message that says what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metrics.calibration.errors import LabelError

__all__ = ["SOURCES", "Label"]

SOURCES = ("HUMAN", "GOLD")
"""The label sources calibration accepts (MLflow ``AssessmentSourceType`` names)."""

_PASS_WORDS = {"pass": 1.0, "passed": 1.0, "yes": 1.0, "true": 1.0, "correct": 1.0, "good": 1.0,
               "fail": 0.0, "failed": 0.0, "no": 0.0, "false": 0.0, "incorrect": 0.0, "bad": 0.0}


@dataclass(frozen=True)
class Label:
    """One judged rollout: the rubric's component values for it and what a reviewer (or the gold answer) said.

    Why a record of its own: the fit needs only the component values and the verdict, so labels read back from
    MLflow assessments can be calibrated without re-running the program; the optional example and prediction let
    new criteria be scored on the same rollouts, and the corrected answer becomes training data.

    Args:
        id: Identifies the rollout, e.g. the MLflow trace id.
        components: ``{component name: value in [0, 1]}``, as ``Score.components`` gives them.
        value: The verdict: ``True``/``False`` (pass/fail), a score in ``[0, 1]``, or a word such as ``"pass"`` /
            ``"fail"`` / ``"yes"`` / ``"no"``; stored as a float.
        source: ``"HUMAN"`` or ``"GOLD"`` (MLflow ``AssessmentSourceType``; an ``AssessmentSource`` works too);
            ``"CODE"``/``"LLM_JUDGE"`` are the rubric's own scores, and calibrating a rubric to itself is circular,
            so they are refused.
        rationale: The reviewer's reason, if any.
        corrected: A corrected answer: a value for the answer field, or ``{output field: value}``.
        example: The example (inputs and gold), needed to score candidate criteria and to build corrected examples.
        prediction: The program's prediction, needed to score candidate criteria and by
            :func:`~metrics.calibration.labels_as_gold`.

    Raises:
        LabelError: For a value that is not a verdict, an unknown source, or component values outside ``[0, 1]``.

    Example:
        >>> Label("tr-1", {"exact_match": 1.0, "length": 0.2}, "pass").value
        1.0
        >>> Label("tr-2", {"exact_match": 1.0}, 0.25, source="gold").source
        'GOLD'
    """

    id: str
    components: Mapping[str, float]
    value: float | bool | str
    source: str = "HUMAN"
    rationale: str = ""
    corrected: Any = None
    example: Any = field(default=None, compare=False, repr=False)
    prediction: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "value", _verdict(self.value, self.id))
        source = str(getattr(self.source, "source_type", self.source)).upper()  # a str or an AssessmentSource
        if source not in SOURCES:
            raise LabelError(f"label {self.id!r} has source {self.source!r}; calibration uses HUMAN or GOLD labels "
                             "(CODE and LLM_JUDGE assessments are the rubric's own scores): filter them out first")
        object.__setattr__(self, "source", source)
        values = {}
        for name, v in dict(self.components).items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not (math.isfinite(v) and -1e-9 <= v <= 1 + 1e-9):
                raise LabelError(f"label {self.id!r}: component {name!r} is {self.components[name]!r}; component "
                                 "values must be numbers in [0, 1] (pass Score.components)")
            values[str(name)] = min(1.0, max(0.0, v))
        object.__setattr__(self, "components", values)
        object.__setattr__(self, "rationale", "" if self.rationale is None else str(self.rationale))

    @property
    def passed(self) -> bool:
        """The verdict as pass/fail: a score counts as a pass from 0.5 up."""
        return self.value >= 0.5


def _verdict(value: Any, label_id: str) -> float:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _PASS_WORDS:
            return _PASS_WORDS[word]
        try:
            value = float(word)
        except ValueError:
            raise LabelError(f"label {label_id!r} has verdict {value!r}; use pass/fail, yes/no, true/false or a "
                             "score in [0, 1]") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"label {label_id!r} has verdict {value!r} of type {type(value).__name__}; use a bool or a "
                         "score in [0, 1]") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise LabelError(f"label {label_id!r} has verdict {number!r}; scores must be in [0, 1] (rescale a 1..5 "
                         "rating to (r - 1) / 4)")
    return number
