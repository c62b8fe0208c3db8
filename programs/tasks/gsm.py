"""Grade-school math word problems, generated offline by ``reasoning-gym``'s ``gsm_symbolic`` (GSM-Symbolic style).

Why generated: GSM8K itself needs a download (see :func:`programs.data.gsm8k` for a local copy); GSM-Symbolic
templates re-instantiate GSM8K problems with fresh names and numbers, so the data is unlimited, seeded and
ships with the package. A ChainOfThought program fits real models; the tiny embedded model scores ~0 here.

Rubric: the last number of the answer must equal the gold number (gated on the answer parsing), plus format
validity; whether the answer is a bare number is logged only.
"""

from __future__ import annotations

from typing import Any

import dspy

from metrics import AnswerType, FormatValidity, NumericMatch, Rubric
from programs.tasks import rg

__all__ = ["cot_program", "predict_program", "rubric", "task"]


def cot_program() -> dspy.Module:
    """The default program: reason step by step, then give the number."""
    return dspy.ChainOfThought("question -> answer")


def predict_program() -> dspy.Module:
    """The answer in one call, no reasoning field."""
    return dspy.Predict("question -> answer")


def rubric() -> Rubric:
    """NumericMatch (weight 3, gated on format) + FormatValidity (1) + bare-number check (logged only)."""
    return Rubric(
        [NumericMatch("answer", name="correct"), FormatValidity(["answer"]),
         AnswerType("answer", "float", name="bare_number")],
        weights={"correct": 3, "format": 1, "bare_number": 0},
        gates={"correct": "format"},
        name="gsm",
    )


def task(**config: Any):
    """The registered ``gsm`` task; ``config`` goes to reasoning-gym's ``gsm_symbolic`` generator.

    Examples carry ``metadata["answer_cot"]``, a worked solution (useful as a gold rationale or SFT target).
    """
    from dataclasses import replace

    base = rg.make_task("gsm", "gsm_symbolic", "Grade-school math word problems (GSM-Symbolic templates, "
                        "reasoning-gym gsm_symbolic)", {}, config)
    return replace(base, programs={"cot": cot_program, "predict": predict_program}, default_program="cot",
                   rubric_factory=rubric,
                   gold_metric=Rubric([NumericMatch("answer", name="correct")], name="gsm_gold"))
