"""Smoke: every task's default program runs end to end on the tiny model through ``optimize()`` (schedule "w").

Tiny sizes (4 train, 4 val, one GRPO step of 2 examples x 2 generations). Only the embedded tasks are
expected to parse on the tiny model; on the others the runs are format failures, which is what this checks:
the program, its data and its rubric go through the whole outer loop (baseline eval, weight stage, eval, save)
without an error. Numbers are not asserted beyond "a score in [0, 1] per stage".
"""

from __future__ import annotations

import json

import pytest

from optimizers import optimize
from programs.registry import get_task
from rl import Policy, WeightStageConfig

TASKS = [
    ("last_digit", {}),
    ("last_digit_long", {}),
    ("rg_basic_arithmetic", {}),
    ("rg_chain_sum", {}),
    ("rg_letter_counting", {}),
    ("rg_spell_backward", {}),
    ("gsm", {}),
    ("multihop", {"k": 2}),
    ("react_tools", {"max_iters": 2}),
]
WEIGHTS = WeightStageConfig(num_generations=2, examples_per_step=2, max_rollouts=4, max_tokens=24,
                            learning_rate=1e-3)


def _smoke(task, policy, tmp_path):
    train, val = task.load("train", 4, seed=0), task.load("val", 4, seed=0)
    result = optimize(task.program(), train, val, metric=task.rubric(), policy=policy, schedule="w",
                      weights=WEIGHTS, gold_metric=task.gold_metric, seed=0, output_dir=tmp_path / "run",
                      progress=False, eval_threads=4, tags={"task": task.name},
                      check_fields=False)  # the point is the whole loop, format failures included
    assert [r.stage for r in result.history] == ["baseline", "w"]
    assert all(0.0 <= r.val_score <= 1.0 for r in result.history)
    if task.gold_metric is not None:
        assert all(0.0 <= r.gold_score <= 1.0 for r in result.history)
    assert set(result.history[-1].val_components) <= set(task.rubric().names)  # empty when no run parsed
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name, options", TASKS, ids=[t[0] for t in TASKS])
def test_task_runs_through_optimize(name, options, tiny_model_dir, tmp_path):
    policy = Policy.from_pretrained(tiny_model_dir, name=f"tiny-{name}")
    result = _smoke(get_task(name, **options), policy, tmp_path)
    if name.startswith("last_digit"):
        assert result.history[0].val_score > 0  # the embedded model parses its own task


def test_a_task_the_model_cannot_format_is_refused_before_any_budget_is_spent(tiny_model_dir, tmp_path):
    from optimizers import FieldsNotProducedError

    task = get_task("react_tools", max_iters=2)
    policy = Policy.from_pretrained(tiny_model_dir, name="tiny-refuse")
    with pytest.raises(FieldsNotProducedError, match="cannot produce these fields"):
        optimize(task.program(), task.load("train", 4, seed=0), task.load("val", 4, seed=0), metric=task.rubric(),
                 policy=policy, schedule="w", weights=WEIGHTS, seed=0, output_dir=tmp_path / "run", progress=False)
    assert policy.version == 0 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_byo_file_task_runs_through_optimize(tiny_model_dir, tmp_path):
    from programs.tasks import last_digit

    rows = [{"q": e.question, "a": e.answer} for e in last_digit.load("train", 80, seed=5)]
    path = tmp_path / "digits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("file", path=str(path), field_map={"question": "q", "answer": "a"}, match="exact",
                    ratios=(0.7, 0.3, 0.0), cache_dir=str(tmp_path / "hf"))
    policy = Policy.from_pretrained(tiny_model_dir, name="tiny-file")
    result = _smoke(task, policy, tmp_path)
    assert result.history[0].val_score > 0
