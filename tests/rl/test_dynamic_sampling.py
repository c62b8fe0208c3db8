"""Dynamic sampling (DAPO) in the weight stage: flat groups are paid for but never trained on, and refilled.

The end-to-end tests use the real tiny model with a metric that makes some examples always right: their groups are
flat by construction, so the test knows which examples must produce no training rows, whatever the model samples.
"""

from __future__ import annotations

import dspy
import pytest

from programs.tasks import last_digit
from rl import WeightStageConfig, train_weights
from rl.advantages import compute_advantages, flat_examples
from rl.grpo import GRPOUpdater
from rl.rollouts import Rollout
from rl.trace import LMCall
from rl.weight_stage import DataCursor

G, E = 4, 4


# --- the pieces ---------------------------------------------------------------------------------


def _rollout(example: int, sample: int, reward: float) -> Rollout:
    call = LMCall(call_id=0, model="m", version=0, messages=(), prompt_ids=(1, 2), completion_ids=(3, 4, 5), text="",
                  finish_reason="stop", predictor=None)
    return Rollout(example, sample, dspy.Example(), dspy.Prediction(), calls=[call], reward=reward)


def test_flat_examples_and_kept_zero_variance_rows():
    rewards = {0: [1, 1, 1, 1], 1: [0, 1, 0, 0], 2: [0.25] * 4}
    rollouts = [_rollout(i, g, r) for i, rs in rewards.items() for g, r in enumerate(rs)]
    assert flat_examples(rollouts) == [0, 2]
    dropped, stats = compute_advantages(rollouts, lambda p: "p")
    assert {r.group[0] for r in dropped} == {1} and stats.zero_variance_groups == 2 and stats.rows_dropped == 8
    kept, kept_stats = compute_advantages(rollouts, lambda p: "p", drop_zero_variance=False)
    assert len(kept) == 12 and kept_stats.rows_dropped == 0 and kept_stats.zero_variance_groups == 2
    assert all(r.advantage == 0.0 for r in kept if r.group[0] != 1)
    assert [r.advantage for r in kept if r.group[0] == 1] == [r.advantage for r in dropped]


def test_cursor_passes_over_a_marked_example_once_and_keeps_it_in_its_state():
    plain, marked = DataCursor(6, seed=3), DataCursor(6, seed=3)
    order = plain.take(13)  # two epochs and one example of the third
    assert sorted(order[:6]) == sorted(order[6:12]) == list(range(6))
    first = marked.take(3)
    assert first == order[:3]
    marked.skip.update(first[:2])  # their groups were flat
    assert marked.state() == {"epoch": 0, "position": 3, "skip": sorted(first[:2])}
    resumed = DataCursor(6, seed=3, **marked.state())
    rest = resumed.take(8)  # the rest of epoch 0, all of epoch 1 but the two marked examples, one of epoch 2
    assert rest == order[3:6] + [i for i in order[6:12] if i not in first[:2]] + [order[12]]
    assert resumed.skipped == 2 and resumed.skip == set() and resumed.state() == {"epoch": 2, "position": 1}


# --- the weight stage on the real tiny model ----------------------------------------------------


def _trainset() -> tuple[list[dspy.Example], set[int]]:
    """12 examples; the 4 "easy" ones are always right under :func:`_metric` (their groups are flat)."""
    easy = last_digit.load("train", 4, seed=7, min_digits=3, max_digits=3)
    hard = last_digit.load("train", 8, seed=7, min_digits=6, max_digits=8)  # the model is unreliable there
    trainset = [hard[0], easy[0], hard[1], hard[2], easy[1], hard[3], hard[4], easy[2], hard[5], hard[6], easy[3],
                hard[7]]
    return trainset, {ex.number for ex in easy}


def _run(policy, dynamic: bool, monkeypatch, max_rollouts: int = 14 * E * G):
    trainset, easy = _trainset()

    def metric(example, pred, trace=None):
        return 1.0 if example.number in easy else last_digit.correct(example, pred)

    trained_prompts: list[str] = []
    to_batch = GRPOUpdater.to_batch

    def spy(self, rows):
        trained_prompts.extend(policy.tokenizer.decode(list(r.prompt_ids)) for r in rows)
        return to_batch(self, rows)

    monkeypatch.setattr(GRPOUpdater, "to_batch", spy)
    sampled: list[dspy.Example] = []
    config = WeightStageConfig(num_generations=G, examples_per_step=E, max_tokens=16, learning_rate=1e-3,
                               micro_batch_size=64, max_rollouts=max_rollouts, deterministic=True,
                               dynamic_sampling=dynamic, seed=0)
    result = train_weights(last_digit.predict_program(), trainset, metric, policy, config, progress=False,
                           monitors=[lambda step, rollouts: sampled.extend(r.example for r in rollouts)])
    return result, sampled, trained_prompts, easy


def _asks_about(prompt: str, numbers: set[int]) -> bool:
    return any(f"last digit of {n}?" in prompt for n in numbers)


@pytest.mark.slow
def test_flat_groups_are_paid_for_never_trained_and_refilled(fresh_policy, monkeypatch):
    result, sampled, trained_prompts, easy = _run(fresh_policy, dynamic=True, monkeypatch=monkeypatch)
    history = result.history
    # every rollout sampled is counted, the always-right examples' included
    assert result.rollouts == len(sampled) == G * sum(h["examples_sampled"] for h in history) <= 14 * E * G
    assert sum(ex.number in easy for ex in sampled) >= 4 * G
    # ... but none of their rollouts became a training row, while other examples' did
    assert trained_prompts and not any(_asks_about(p, easy) for p in trained_prompts)
    assert sum(h["rows"] for h in history) == len(trained_prompts)
    # refilled: every step trains on E informative groups, unless it drew its cap of 2E examples or ran out of budget
    assert any(h["examples_sampled"] > E for h in history)
    for h in history[:-1]:
        informative = h["groups"] - h["zero_variance_groups"]  # one predictor: one group per example
        assert informative == E or h["examples_sampled"] == 2 * E, h
    # a flat example is passed over at its next turn: over several epochs the cursor skipped some
    assert sum(h["examples_skipped"] for h in history) > 0
    assert result.rollouts + E * G > 14 * E * G  # the budget was spent down to less than one step
    assert len(history) < 14  # ... in fewer, fuller steps


@pytest.mark.slow
def test_without_the_switch_flat_groups_are_neither_refilled_nor_skipped(fresh_policy, monkeypatch):
    result, sampled, trained_prompts, easy = _run(fresh_policy, dynamic=False, monkeypatch=monkeypatch,
                                                  max_rollouts=6 * E * G)
    history = result.history
    assert len(history) == 6 and result.rollouts == len(sampled) == 6 * E * G
    assert all(h["examples_sampled"] == E and h["examples_skipped"] == 0 for h in history)
    assert any(h["groups"] - h["zero_variance_groups"] < E for h in history)  # the easy examples' flat groups
    assert not any(_asks_about(p, easy) for p in trained_prompts)  # never trained on, with or without the switch
