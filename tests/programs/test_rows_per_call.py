"""The multi-hop and ReAct programs give the weight stage one training row per predictor call and per agent step.

Sampling is scripted (see ``conftest.py``): sample 0 of every example follows the gold path and answers right,
sample 1 answers wrong (the ReAct one also makes an invalid tool call first), so every (example, predictor)
group has reward variance and no row is dropped. Rollouts, the task rubrics and ``compute_advantages`` are the
real code.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from programs.registry import get_task
from rl.advantages import compute_advantages, predictor_namer
from rl.rollouts import run_rollouts


def chat_fields(**fields) -> str:
    """A completion in ChatAdapter's format: ``[[ ## name ## ]]`` blocks, then ``[[ ## completed ## ]]``."""
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"


def _question(messages) -> str:
    match = re.search(r"\[\[ ## question ## \]\]\n(.*?)\n", messages[-1]["content"])
    assert match, messages[-1]["content"][:200]
    return match.group(1)


def test_multihop_rows_for_every_predictor_call(scripted_lm):
    task = get_task("multihop", k=2)
    program = task.program()
    examples = task.load("train", 3, seed=0)
    by_question = {ex.question: ex for ex in examples}
    name_of = predictor_namer(program)

    def script(predictor, messages, tag, index):
        ex, sample = by_question[_question(messages)], tag[2]
        name = name_of(predictor)
        if name == "first_query":
            return chat_fields(search_query=ex.gold_queries[0])
        if name == "second_query":
            return chat_fields(search_query=ex.gold_queries[1])
        assert name == "answer.predict", name
        return chat_fields(reasoning="From the passages.", answer=ex.answer if sample == 0 else "Atlantis")

    rollouts = run_rollouts(program, examples, scripted_lm(script), task.rubric(), num_generations=2, tag="mh")
    assert all(r.error is None for r in rollouts)
    assert [len(r.calls) for r in rollouts] == [3] * 6
    assert [r.reward for r in rollouts] == [1.0, 0.4] * 3  # right (3+1+1)/5 vs wrong but retrieved (0+1+1)/5
    assert all(r.components["retrieval_recall"] == 1.0 for r in rollouts)  # the gold queries found the gold passages

    rows, stats = compute_advantages(rollouts, name_of)
    assert stats.groups == 3 * 3 and stats.zero_variance_groups == 0
    assert len(rows) == sum(len(r.calls) for r in rollouts) == 18
    assert Counter(row.group[1] for row in rows) == {"first_query": 6, "second_query": 6, "answer.predict": 6}
    assert all(row.prompt_ids and row.completion_ids for row in rows)
    assert {row.advantage > 0 for row in rows if row.reward == 1.0} == {True}


def test_react_rows_for_every_agent_step(scripted_lm):
    task = get_task("react_tools", max_iters=6)
    program = task.program()
    examples = task.load("train", 2, seed=0)
    by_question = {ex.question: ex for ex in examples}
    name_of = predictor_namer(program)

    def script(predictor, messages, tag, index):
        ex, sample = by_question[_question(messages)], tag[2]
        if name_of(predictor) == "extract.predict":
            return chat_fields(reasoning="Computed with the tools.", answer=ex.answer if sample == 0 else "-1")
        assert name_of(predictor) == "react"
        plan = list(ex.gold_calls)
        if sample == 1:  # a wasted, invalid step first
            plan = [{"tool": "calculator", "args": {"expression": "two plus two"}}, *plan]
        if index < len(plan):
            step = plan[index]
            return chat_fields(next_thought="Next I use a tool.", next_tool_name=step["tool"],
                               next_tool_args=json.dumps(step["args"]))
        return chat_fields(next_thought="I have everything.", next_tool_name="finish", next_tool_args="{}")

    rollouts = run_rollouts(program, examples, scripted_lm(script), task.rubric(), num_generations=2,
                            num_threads=1, tag="react")
    assert all(r.error is None for r in rollouts)
    for r in rollouts:
        steps = r.example.gold_steps + (1 if r.sample == 1 else 0)  # tool steps incl. finish
        assert len(r.calls) == steps + 1, "every agent step plus the final extraction is one recorded call"
        trajectory = r.prediction.trajectory
        assert [trajectory[f"tool_name_{i}"] for i in range(steps)][-1] == "finish"
        assert "Execution error" not in " ".join(str(trajectory[f"observation_{i}"]) for i in range(r.sample, steps))
    gold = [r for r in rollouts if r.sample == 0]
    assert all(r.reward == 1.0 and r.components["tool_validity"] == 1.0 for r in gold)
    wrong = [r for r in rollouts if r.sample == 1]
    assert all(r.components["correct"] == 0.0 and r.components["tool_validity"] < 1.0 and r.components["steps"] < 1.0
               for r in wrong)

    rows, stats = compute_advantages(rollouts, name_of)
    assert stats.zero_variance_groups == 0
    assert len(rows) == sum(len(r.calls) for r in rollouts)
    per_group = Counter(row.group for row in rows)
    for i, ex in enumerate(examples):
        assert per_group[(i, "react")] == ex.gold_steps + ex.gold_steps + 1  # both samples' steps
        assert per_group[(i, "extract.predict")] == 2


@pytest.mark.slow
def test_on_the_tiny_model_failed_episodes_are_format_failures(tiny_policy):
    """Real sampling: the tiny model cannot follow these formats; each run is a recorded, scored format failure."""
    lm = tiny_policy.lm(temperature=1.0, max_tokens=32, cache=False)
    for name, options in (("multihop", {"k": 2}), ("react_tools", {"max_iters": 2})):
        task = get_task(name, **options)
        program = task.program()
        rollouts = run_rollouts(program, task.load("train", 2, seed=0), lm, task.rubric(), num_generations=2)
        assert len(rollouts) == 4
        for r in rollouts:
            assert r.calls, "every rollout records at least one real engine call"
            if r.error is not None:
                assert r.reward == 0.0 and r.prediction.get("cotune_error")
