""":func:`propose_criteria`: a proposer LM drafts new LM-judge criteria from labelled rollouts.

Why a module of its own: when no component captures what reviewers judge, weights alone cannot fix the rubric; a
strong LM that reads judged rollouts can name the missing quality. Drafting is separate from keeping: a drafted
criterion earns its place only if :func:`~metrics.calibration.fit.calibrate_with_candidates` finds it raises
agreement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import dspy
import pydantic

from metrics.base import MISSING, get_field, input_items
from metrics.calibration.labels import Label
from metrics.judge import LMJudge
from metrics.rubric import Rubric

__all__ = ["ProposeCriteria", "ProposedCriterion", "propose_criteria"]


class ProposedCriterion(pydantic.BaseModel):
    """One drafted criterion: a short snake_case name and the criterion text an LM judge grades against."""

    name: str
    criterion: str


class ProposeCriteria(dspy.Signature):
    """Reviewers judged responses to a task as PASS or FAIL. Propose grading criteria for a strict LM judge that
    separate the PASS responses from the FAIL ones, especially where the existing rubric components disagree with
    the reviewers. Each criterion checks one quality, can be judged from the task inputs and the response alone
    (no gold answer), and says what a good response does. Give each a short snake_case name."""

    task_description: str = dspy.InputField(desc="what the program is for")
    existing_components: str = dspy.InputField(desc="the rubric's current components, one per line")
    labelled_examples: str = dspy.InputField(desc="judged responses: verdict, inputs, response, reviewer rationale")
    n: int = dspy.InputField(desc="how many criteria to propose")
    criteria: list[ProposedCriterion] = dspy.OutputField(desc="the proposed criteria")


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", text.lower())).strip("_")[:40]


def _render(labels: Sequence[Label], field_name: str | None, limit: int) -> str:
    passes = [lab for lab in labels if lab.passed]
    fails = [lab for lab in labels if not lab.passed]
    chosen: list[Label] = []
    while len(chosen) < limit and (passes or fails):  # alternate verdicts so both kinds are shown
        for pool in (fails, passes):
            if pool and len(chosen) < limit:
                chosen.append(pool.pop(0))
    blocks = []
    for i, lab in enumerate(chosen, 1):
        inputs = "; ".join(f"{k}: {v}" for k, v in input_items(lab.example).items()) or "(not recorded)"
        if lab.prediction is None:
            response = "(not recorded)"
        elif field_name is not None and get_field(lab.prediction, field_name) is not MISSING:
            response = str(get_field(lab.prediction, field_name))
        else:
            response = "; ".join(f"{k}: {v}" for k, v in input_items(lab.prediction).items())
        response = response if len(response) <= 600 else response[:597] + "..."
        verdict = ("PASS" if lab.passed else "FAIL") + (f" ({lab.value:.2f})" if 0 < lab.value < 1 else "")
        comps = ", ".join(f"{k}={v:.2f}" for k, v in lab.components.items())
        blocks.append(f"#{i} {verdict}\ninputs: {inputs}\nresponse: {response}\nrubric components: {comps}"
                      + (f"\nreviewer: {lab.rationale}" if lab.rationale else ""))
    return "\n\n".join(blocks)


def propose_criteria(task_description: str, labelled_examples: Sequence[Label], proposer_lm: Any, n: int = 3, *,
                     judge_lm: Any = None, existing: Rubric | Sequence[str] = (), field: str | None = "answer",
                     max_examples: int = 20) -> list[LMJudge]:
    """Ask a proposer LM to draft new :class:`~metrics.judge.LMJudge` components from labelled rollouts.

    Why: when no component captures what reviewers judge (e.g. they fail rambling answers and the rubric only has
    correctness and format), weights alone cannot fix the rubric. A strong LM that reads judged rollouts can name
    the missing quality; :func:`~metrics.calibration.calibrate_with_candidates` then keeps a criterion only if it
    raises agreement.

    Args:
        task_description: What the program is for, in a sentence or two.
        labelled_examples: Labels with their example and prediction (verdicts of both kinds are shown, alternating).
        proposer_lm: The ``dspy.LM`` that drafts the criteria (an API model works best).
        n: How many criteria to ask for.
        judge_lm: The ``dspy.LM`` the drafted judges grade with (``None``: ``dspy.settings.lm`` at call time).
        existing: The rubric (or its component names); new names never collide with these.
        field: Prediction field the judges grade (``None``: all output fields).
        max_examples: Most labelled rollouts shown to the proposer.

    Returns:
        Up to ``n`` judges named after the proposals (snake_case, unique among themselves and ``existing``).

    Example:
        >>> from dspy.utils import DummyLM
        >>> lm = DummyLM([{"criteria": [{"name": "Concise", "criterion": "The answer is one short phrase."}]}])
        >>> labels = [Label("t1", {"exact_match": 1}, "pass", example={"question": "Capital of France?"},
        ...                 prediction={"answer": "Paris"})]
        >>> [(j.name, j.criterion) for j in propose_criteria("Answer geography questions.", labels, lm, n=1)]
        [('concise', 'The answer is one short phrase.')]
    """
    if isinstance(existing, Rubric):
        described = {name: getattr(c, "criterion", None) or repr(c) for name, c in existing.components.items()}
    else:
        described = {str(name): "" for name in existing}
    names = set(described)
    listing = "\n".join(f"- {name}: {text}" if text else f"- {name}" for name, text in described.items()) or "(none)"
    out = dspy.Predict(ProposeCriteria)(
        task_description=task_description, existing_components=listing,
        labelled_examples=_render(list(labelled_examples), field, max_examples), n=int(n), lm=proposer_lm)
    judges: list[LMJudge] = []
    for i, prop in enumerate(list(get_field(out, "criteria", None) or [])[:n], 1):
        criterion = str(get_field(prop, "criterion", "") or "").strip()
        if not criterion:
            continue
        name = _slug(str(get_field(prop, "name", "") or "")) or f"criterion_{i}"
        base, k = name, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        judges.append(LMJudge(criterion, lm=judge_lm, name=name, field=field))
    return judges
