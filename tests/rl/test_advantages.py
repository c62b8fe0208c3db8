"""mmGRPO advantages per (example, predictor), checked against hand computation."""

from __future__ import annotations

import math

import dspy
import pytest

from rl.advantages import compute_advantages
from rl.rollouts import Rollout
from rl.trace import LMCall

PROPOSE, FINAL = object(), object()
NAMES = {id(PROPOSE): "propose", id(FINAL): "final"}


def name_of(predictor):
    return NAMES[id(predictor)]


def call(predictor, n_tokens=3, finish="stop"):
    return LMCall(call_id=0, model="m", version=0, messages=(), prompt_ids=(1, 2), completion_ids=tuple(range(n_tokens)),
                  text="", finish_reason=finish, predictor=predictor)


def rollout(example, sample, reward, predictors):
    return Rollout(example_index=example, sample=sample, example=dspy.Example(), prediction=dspy.Prediction(),
                   calls=[call(p) for p in predictors], reward=reward)


def test_group_advantages_match_hand_computation():
    rollouts = [
        # example 0: rewards 1, 0, 0.5; every rollout calls both predictors; the last one calls `final` twice
        rollout(0, 0, 1.0, [PROPOSE, FINAL]),
        rollout(0, 1, 0.0, [PROPOSE, FINAL]),
        rollout(0, 2, 0.5, [PROPOSE, FINAL, FINAL]),
        # example 1: all rewards equal -> zero-variance groups, dropped
        rollout(1, 0, 1.0, [PROPOSE, FINAL]),
        rollout(1, 1, 1.0, [PROPOSE, FINAL]),
        rollout(1, 2, 1.0, [PROPOSE, FINAL]),
        # example 2: only two rollouts reach `final` (the third failed early)
        rollout(2, 0, 1.0, [PROPOSE, FINAL]),
        rollout(2, 1, 0.0, [PROPOSE, FINAL]),
        rollout(2, 2, 0.0, [PROPOSE]),
    ]
    rows, stats = compute_advantages(rollouts, name_of, scale_rewards="group", eps=0.0)
    assert stats.groups == 6 and stats.zero_variance_groups == 2
    assert stats.rows_dropped == 6 and stats.rows == len(rows) == 7 + 5

    def advs(group):
        return [round(r.advantage, 6) for r in rows if r.group == group]

    # example 0: mean 0.5, population std sqrt(1/6); `final` appears twice for the third rollout (same advantage)
    std0 = math.sqrt(((0.5) ** 2 + (0.5) ** 2 + 0) / 3)
    assert advs((0, "propose")) == [round(0.5 / std0, 6), round(-0.5 / std0, 6), 0.0]
    assert advs((0, "final")) == [round(0.5 / std0, 6), round(-0.5 / std0, 6), 0.0, 0.0]
    # example 2, propose: rewards (1, 0, 0): mean 1/3, std sqrt(2/9)
    std2 = math.sqrt(2 / 9)
    assert advs((2, "propose")) == [round((2 / 3) / std2, 6), round((-1 / 3) / std2, 6), round((-1 / 3) / std2, 6)]
    # example 2, final: only rollouts 0 and 1: rewards (1, 0): mean 0.5, std 0.5
    assert advs((2, "final")) == [1.0, -1.0]


def test_scaling_options():
    rollouts = [rollout(0, 0, 1.0, [FINAL]), rollout(0, 1, 0.0, [FINAL]),
                rollout(1, 0, 0.2, [FINAL]), rollout(1, 1, 0.0, [FINAL])]
    none, _ = compute_advantages(rollouts, name_of, scale_rewards="none")
    assert [round(r.advantage, 6) for r in none] == [0.5, -0.5, 0.1, -0.1]
    batch, _ = compute_advantages(rollouts, name_of, scale_rewards="batch", eps=0.0)
    batch_std = math.sqrt(sum((x - 0.3) ** 2 for x in (1.0, 0.0, 0.2, 0.0)) / 4)
    assert [round(r.advantage, 6) for r in batch] == [round(a / batch_std, 6) for a in (0.5, -0.5, 0.1, -0.1)]
    group, _ = compute_advantages(rollouts, name_of, scale_rewards="group", eps=0.0)
    assert [round(r.advantage, 6) for r in group] == [1.0, -1.0, 1.0, -1.0]
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(rollouts, name_of, scale_rewards="token")


def test_truncated_calls_are_flagged():
    rollouts = [Rollout(0, 0, dspy.Example(), dspy.Prediction(), [call(FINAL, finish="length")], reward=1.0),
                Rollout(0, 1, dspy.Example(), dspy.Prediction(), [call(FINAL)], reward=0.0)]
    rows, _ = compute_advantages(rollouts, name_of)
    assert [r.truncated for r in rows] == [True, False]
