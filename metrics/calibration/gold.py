"""Human labels as the gold metric of a :class:`~metrics.guards.GoldGuard` (:func:`labels_as_gold`).

Why a module of its own: where no gold answers exist, what reviewers accepted is the best gold there is, and the
guard needs a metric the optimiser never sees. This is a use of labels apart from the fit: it needs each label's
example id and answer, not its component values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from metrics.base import MISSING, get_field, short_repr
from metrics.calibration.errors import LabelError, UnlabelledExampleError
from metrics.calibration.labels import Label
from metrics.parsing import normalize_text

__all__ = ["LabelGold", "labels_as_gold"]


class LabelGold:
    """Human and gold labels as a gold metric ``(example, prediction, trace=None) -> float`` for a
    :class:`~metrics.guards.GoldGuard`.

    For the example's id, a prediction scores the verdict of the label on the same answer (normalised as in
    SQuAD); otherwise 1.0 if it matches a corrected answer or a passed answer of that example, 0.0 if the example
    has such an accepted answer and this is not it. An answer no label covers scores ``default`` (or raises
    :class:`UnlabelledExampleError` when ``default`` is ``None``). Build it with :func:`labels_as_gold`.
    """

    def __init__(self, labels: Sequence[Label], *, id_field: str = "id", field: str = "answer",
                 default: float | None = None, name: str = "human_gold") -> None:
        self.id_field = id_field
        self.field = field
        self.default = default
        self.name = name
        self.verdicts: dict[str, dict[str, float]] = {}
        self.accepted: dict[str, set[str]] = {}
        for lab in labels:
            key = self._example_id(lab.example) if lab.example is not None else lab.id
            answer = self._answer(lab.prediction)
            if answer is not None:
                self.verdicts.setdefault(key, {})[answer] = lab.value
                if lab.passed:
                    self.accepted.setdefault(key, set()).add(answer)
            corrected = lab.corrected.get(field) if isinstance(lab.corrected, Mapping) else lab.corrected
            if corrected is not None:
                self.accepted.setdefault(key, set()).add(normalize_text(corrected))
        if not self.verdicts and not self.accepted:
            raise LabelError(f"no label has a prediction with field {field!r} or a corrected answer: LabelGold has "
                             "nothing to compare with")

    def _example_id(self, example: Any) -> str:
        value = get_field(example, self.id_field)
        if value is MISSING or value is None:
            raise LabelError(f"example {short_repr(example)} has no id field {self.id_field!r}; give examples ids "
                             "(dspy.Example(..., id=...)) or pass id_field=")
        return str(value)

    def _answer(self, prediction: Any) -> str | None:
        value = get_field(prediction, self.field, None) if prediction is not None else None
        return None if value is None else normalize_text(value)

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> float:
        key = self._example_id(example)
        answer = self._answer(prediction)
        if answer is not None and answer in self.verdicts.get(key, {}):
            return self.verdicts[key][answer]
        if self.accepted.get(key):
            return 1.0 if answer in self.accepted[key] else 0.0
        if self.default is not None:
            return float(self.default)
        raise UnlabelledExampleError(f"no label covers example id {key!r} with answer {answer!r}: label it, limit "
                                     "the guard to labelled examples, or pass labels_as_gold(..., default=...)")

    def __repr__(self) -> str:
        return f"LabelGold({len(set(self.verdicts) | set(self.accepted))} examples, field={self.field!r})"


def labels_as_gold(labels: Sequence[Label], *, id_field: str = "id", field: str = "answer",
                   default: float | None = None) -> LabelGold:
    """Human labels keyed by example id as the gold metric of a :class:`~metrics.guards.GoldGuard`.

    Why: where no gold answers exist, what reviewers accepted is the best gold there is, and the guard needs a
    metric the optimiser never sees. Labels need ``example`` (with an id field) and ``prediction`` or ``corrected``.

    Example:
        >>> from metrics import GoldGuard
        >>> labels = [Label("tr-1", {}, "fail", example={"id": "q1"}, prediction={"answer": "Lyon"},
        ...                 corrected="Paris")]
        >>> guard = GoldGuard(labels_as_gold(labels))
        >>> guard.gold_score({"id": "q1"}, {"answer": "paris"}), guard.gold_score({"id": "q1"}, {"answer": "Lyon"})
        (1.0, 0.0)
    """
    return LabelGold(labels, id_field=id_field, field=field, default=default)
