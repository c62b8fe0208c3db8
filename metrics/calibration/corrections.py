""":func:`corrected_examples`: reviewers' corrected answers as training examples that record where they came from.

Why a module of its own: a correction is the most direct label there is, and it feeds training (demos, GRPO) rather
than the fit; its provenance (source, label id, rationale) lets anyone trace a training example back to the
review.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from metrics.base import MISSING, get_field
from metrics.calibration.errors import LabelError
from metrics.calibration.labels import Label

__all__ = ["corrected_examples"]


def corrected_examples(labels: Sequence[Label], *, field: str = "answer",
                       input_keys: Sequence[str] | None = None) -> list[dspy.Example]:
    """Reviewers' corrected answers as training examples, each carrying a ``provenance`` field.

    Why: a correction is the most direct label there is; as an example it can train the program (demos, GRPO), and
    its provenance (source, label id, rationale) lets anyone trace a training example back to the review.

    Args:
        labels: Labels; those without ``corrected`` are skipped.
        field: Output field a plain corrected value goes to (a mapping gives all output fields itself).
        input_keys: Input fields of the example; default: ``example.inputs()`` of a ``dspy.Example`` with marked
            inputs.

    Raises:
        LabelError: A corrected label has no example, or its inputs are unknown (pass ``input_keys``).

    Example:
        >>> import dspy
        >>> ex = dspy.Example(question="Capital of France?", answer="Lyon").with_inputs("question")
        >>> [new] = corrected_examples([Label("tr-9", {}, "fail", rationale="wrong city", corrected="Paris",
        ...                                   example=ex)])
        >>> new.answer, new.inputs().keys(), new.provenance["label_id"]
        ('Paris', ['question'], 'tr-9')
    """
    out = []
    for lab in labels:
        if lab.corrected is None:
            continue
        if lab.example is None:
            raise LabelError(f"label {lab.id!r} has a corrected answer but no example: build it with example= "
                             "(the trace's inputs)")
        if input_keys is not None:
            inputs = {k: get_field(lab.example, k) for k in input_keys}
            if any(v is MISSING for v in inputs.values()):
                raise LabelError(f"label {lab.id!r}: example lacks input fields "
                                 f"{[k for k, v in inputs.items() if v is MISSING]}")
        else:
            inputs = _marked_inputs(lab.example)
            if not inputs:
                raise LabelError(f"label {lab.id!r}: cannot tell the example's inputs; pass a dspy.Example with "
                                 "with_inputs(...) or input_keys=[...]")
        outputs = dict(lab.corrected) if isinstance(lab.corrected, Mapping) else {field: lab.corrected}
        provenance = {"source": lab.source, "label_id": lab.id, "rationale": lab.rationale, "verdict": lab.value}
        extra = {}
        example_id = get_field(lab.example, "id", None)
        if example_id is not None:
            extra["id"] = example_id
        out.append(dspy.Example(**inputs, **outputs, **extra, provenance=provenance).with_inputs(*inputs))
    return out


def _marked_inputs(example: Any) -> dict[str, Any]:
    """The input fields a ``dspy.Example`` marked with ``with_inputs(...)``; ``{}`` when none are marked (DSPy's
    public ``inputs()`` raises ``ValueError`` then) or ``example`` is not a ``dspy.Example``."""
    if not isinstance(example, dspy.Example):
        return {}
    try:
        return dict(example.inputs().items())
    except ValueError:
        return {}
