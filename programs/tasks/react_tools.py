"""A tool-using agent: ``dspy.ReAct`` with a corpus lookup, a calculator and a unit converter, multi-step episodes.

Why: an agent's episode is a loop of LM calls whose length depends on the model; the weight stage must train on
every step of it, and the rubric must reward more than the final answer. Questions (generated with the corpus,
:mod:`programs.tasks.world`) need 2-3 tool calls: "How many years after Logrus Trading was Vialem Industries
founded?" = two lookups and a subtraction.

Rubric: numeric correctness (tolerance 1%, gated on format, weight 4), format validity (1), tool-call validity
(share of calls that ran without error, 1) and a step-count penalty (1 up to the question's gold number of
steps, falling linearly to 0 at the step limit, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from metrics import FormatValidity, NumericMatch, Rubric
from metrics.base import ComponentResult, get_field
from programs.tasks.corpus import count_option, question_loader
from programs.tasks.tools import make_tools

__all__ = ["KINDS", "StepPenalty", "ToolCallValidity", "agent_program", "rubric", "task", "tool_steps"]

KINDS = ("founding_gap", "elevation_feet", "total_employees", "founding_age")
DEFAULT_MAX_ITERS = 6
ERROR_PREFIX = "Execution error in "  # how dspy.ReAct reports a tool that raised, as the step's observation


class ToolQuestion(dspy.Signature):
    """Answer the question using the tools. Give the final answer as a number only, without units."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a number")


def agent_program(max_iters: int = DEFAULT_MAX_ITERS) -> dspy.Module:
    """``dspy.ReAct`` over lookup, calculator and convert_units, at most ``max_iters`` tool steps per episode."""
    return dspy.ReAct(ToolQuestion, tools=make_tools(), max_iters=max_iters)


def tool_steps(prediction: Any) -> list[tuple[str, Any, str]]:
    """``(tool name, args, observation)`` of every step in a ReAct prediction's trajectory (``[]`` if none)."""
    trajectory = get_field(prediction, "trajectory", None) or {}
    steps = []
    i = 0
    while f"tool_name_{i}" in trajectory:
        steps.append((trajectory[f"tool_name_{i}"], trajectory.get(f"tool_args_{i}"),
                      str(trajectory.get(f"observation_{i}", ""))))
        i += 1
    return steps


class ToolCallValidity:
    """Share of the episode's tool calls (``finish`` excluded) that ran without an error; 0 when none was made."""

    name = "tool_validity"

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        calls = [s for s in tool_steps(prediction) if s[0] != "finish"]
        if not calls:
            return ComponentResult(0.0, "no tool was called")
        bad = [f"{name}({args})" for name, args, obs in calls if obs.startswith(ERROR_PREFIX)]
        return ComponentResult(1 - len(bad) / len(calls), f"calls that failed: {', '.join(bad)[:200]}" if bad else "")

    def __repr__(self) -> str:
        return "ToolCallValidity()"


class StepPenalty:
    """1.0 up to the example's ``gold_steps``; then linearly down to 0.0 one step past ``max_iters``."""

    name = "steps"

    def __init__(self, max_iters: int = DEFAULT_MAX_ITERS) -> None:
        self.max_iters = max_iters

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        steps = len(tool_steps(prediction))
        gold = int(example["gold_steps"])
        if steps == 0:
            return ComponentResult(0.0, "no steps in the trajectory")
        if steps <= gold:
            return ComponentResult(1.0)
        over = steps - gold
        room = max(1, self.max_iters + 1 - gold)
        return ComponentResult(max(0.0, 1 - over / room), f"{steps} steps where {gold} suffice")

    def __repr__(self) -> str:
        return f"StepPenalty(max_iters={self.max_iters})"


def rubric(max_iters: int = DEFAULT_MAX_ITERS) -> Rubric:
    """Correctness (4, gated on format) + format (1) + tool-call validity (1) + step penalty (1)."""
    return Rubric([NumericMatch("answer", rel_tol=0.01, name="correct"), FormatValidity(["answer"]),
                   ToolCallValidity(), StepPenalty(max_iters)],
                  weights={"correct": 4, "format": 1, "tool_validity": 1, "steps": 1},
                  gates={"correct": "format"}, name="react_tools")


def _example(row: dict) -> dspy.Example:
    return dspy.Example(question=row["question"], answer=row["answer"], gold_calls=row["gold_calls"],
                        gold_steps=row["gold_steps"], kind=row["kind"], id=row["id"]).with_inputs("question")


def task(max_iters: int = DEFAULT_MAX_ITERS, kinds: Sequence[str] = KINDS):
    """The registered ``react_tools`` task: ``max_iters`` bounds an episode's tool steps; ``kinds`` picks questions."""
    from programs.registry import Task

    loader = question_loader("react_tools", "tools.jsonl", kinds, KINDS, _example)
    count_option(max_iters, "react_tools max_iters")

    return Task(
        name="react_tools",
        description="ReAct agent with lookup, calculator and unit-conversion tools (multi-step episodes)",
        loader=loader,
        programs={"react": lambda: agent_program(max_iters)},
        rubric_factory=lambda: rubric(max_iters),
        default_program="react",
        gold_metric=Rubric([NumericMatch("answer", rel_tol=0.01, name="correct")], name="react_tools_gold"),
        options={"max_iters": max_iters, "kinds": list(kinds)},
    )
