"""Tests for the reward-hacking guards: GoldGuard, DegeneracyMonitor, ComponentTrends."""

import logging
import random

import pytest

from metrics import (
    ComponentTrends,
    DegeneracyMonitor,
    ExactMatch,
    GoldGuard,
    GuardEvent,
    RewardHackingError,
    RewardHackingWarning,
    Rubric,
    RubricConfigError,
)


def gold_exact(example, pred, trace=None):
    return example["answer"] == pred["answer"]


# ------------------------------------------------------------------ GoldGuard
def test_gold_guard_fires_when_reward_up_and_gold_down(caplog):
    guard = GoldGuard(gold_exact, tolerance=0.02)
    assert guard.check("p1", reward=0.50, gold=0.60) is None  # first observation: nothing to compare
    with caplog.at_level(logging.WARNING), pytest.warns(RewardHackingWarning, match="reward rose 0.500 -> 0.700"):
        event = guard.check("w1", reward=0.70, gold=0.55)
    assert isinstance(event, GuardEvent)
    assert event.kind == "gold_divergence" and event.step == "w1"
    assert event.data["reward_delta"] == pytest.approx(0.2) and event.data["gold_delta"] == pytest.approx(-0.05)
    assert event.data["ref_step"] == "p1"
    assert guard.events == [event]
    assert "Possible reward hacking" in caplog.text


@pytest.mark.parametrize(
    ("reward", "gold"),
    [
        (0.70, 0.59),  # gold fell, but within tolerance
        (0.70, 0.58),  # exactly at the tolerance boundary (0.02): not beyond it
        (0.70, 0.70),  # both rose
        (0.40, 0.30),  # both fell: not hacking, just worse
        (0.50, 0.30),  # reward flat
    ],
)
def test_gold_guard_quiet_otherwise(recwarn, reward, gold):
    guard = GoldGuard(gold_exact, tolerance=0.02)
    guard.check("p1", reward=0.50, gold=0.60)
    assert guard.check("w1", reward=reward, gold=gold) is None
    assert guard.events == [] and not [w for w in recwarn if issubclass(w.category, RewardHackingWarning)]


def test_gold_guard_stop_raises_after_recording():
    guard = GoldGuard(gold_exact, tolerance=0.0, action="stop")
    guard.check("p1", reward=0.5, gold=0.6)
    with pytest.raises(RewardHackingError) as info:
        guard.check("w1", reward=0.9, gold=0.4)
    assert info.value.event is guard.events[0]
    assert info.value.event.kind == "gold_divergence" and "action='warn'" in str(info.value)
    assert guard.history[-1] == ("w1", 0.9, 0.4)


def test_gold_guard_compare_to_previous_or_first():
    previous = GoldGuard(gold_exact)
    first = GoldGuard(gold_exact, compare_to="first")
    for guard in (previous, first):
        guard.check(0, 0.5, 0.6)
        guard.check(1, 0.6, 0.7)
    with pytest.warns(RewardHackingWarning):
        assert previous.check(2, 0.7, 0.65) is not None  # vs step 1: gold fell 0.05
    assert first.check(2, 0.7, 0.65) is None  # vs step 0: gold rose


def test_gold_guard_scores_gold_and_validates_config():
    guard = GoldGuard(gold_exact)
    assert guard.gold_score({"answer": "4"}, {"answer": "4"}) == 1.0
    assert GoldGuard(Rubric([ExactMatch()])).gold_score({"answer": "4"}, {"answer": "5"}) == 0.0
    with pytest.raises(RubricConfigError):
        GoldGuard(gold_exact, action="explode")
    with pytest.raises(RubricConfigError):
        GoldGuard(gold_exact, tolerance=-0.1)


# ------------------------------------------------------------------ DegeneracyMonitor
def test_degeneracy_stats_hand_computed():
    monitor = DegeneracyMonitor(ngram=2)
    stats, events = monitor.observe(0, ["a b a b", "x y z", "x y z"])
    # "a b a b": bigrams ab ba ab -> 1 - 2/3 = 1/3; "x y z": xy yz -> 0
    assert stats["repetition_rate"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert stats["mean_chars"] == pytest.approx((7 + 5 + 5) / 3)
    assert stats["mean_words"] == pytest.approx((4 + 3 + 3) / 3)
    assert stats["duplicate_rate"] == pytest.approx(1 / 3)
    assert stats["n"] == 3 and events == []


def test_degeneracy_flags_repetition():
    monitor = DegeneracyMonitor(max_repetition=0.5)
    looped = ["the answer is 4 " * 10, "so so so so so so so so so"]
    stats, events = monitor.observe(3, looped)
    assert stats["repetition_rate"] > 0.5
    assert [e.kind for e in events] == ["repetition"] and events[0].step == 3
    assert monitor.events == events


def test_degeneracy_flags_length_and_growth():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]

    def text(n):
        return " ".join(rng.choice(words) + str(i) for i in range(n))  # distinct words: no repetition

    monitor = DegeneracyMonitor(max_mean_chars=400, growth_factor=3.0)
    _, first = monitor.observe(0, [text(10) for _ in range(4)])
    assert first == []
    _, mid = monitor.observe(1, [text(20) for _ in range(4)])
    assert mid == []  # ~2x: below the growth factor
    stats, late = monitor.observe(2, [text(80) for _ in range(4)])
    assert sorted(e.kind for e in late) == ["length", "length_growth"]
    growth = next(e for e in late if e.kind == "length_growth")
    assert growth.data["first_mean_chars"] < stats["mean_chars"] / 3


def test_degeneracy_empty_batch_and_config():
    stats, events = DegeneracyMonitor().observe(0, [])
    assert stats["n"] == 0 and events == []
    with pytest.raises(RubricConfigError):
        DegeneracyMonitor(growth_factor=0.5)


# ------------------------------------------------------------------ ComponentTrends
def test_trends_flag_rise_driven_by_one_component():
    trends = ComponentTrends({"correct": 0.6, "format": 0.2, "length": 0.2}, correctness=["correct"])
    trends.update(0, {"correct": 0.40, "format": 0.50, "length": 0.50})
    trends.update(1, {"correct": 0.40, "format": 0.70, "length": 0.52})
    trends.update(2, {"correct": 0.39, "format": 1.00, "length": 0.55})
    assert trends.deltas() == pytest.approx({"correct": -0.01, "format": 0.5, "length": 0.05})
    events = trends.events()
    assert [e.kind for e in events] == ["one_component_rise"]
    assert events[0].data["component"] == "format" and events[0].step == 2
    # weighted: format 0.2*0.5=0.1, length 0.01, correct -0.006 -> total 0.104; share 0.1/0.104
    assert events[0].data["share"] == pytest.approx(0.1 / 0.104)


def test_trends_quiet_when_correctness_rises_or_rise_is_spread():
    trends = ComponentTrends({"correct": 0.5, "format": 0.5}, correctness=["correct"])
    trends.update(0, {"correct": 0.4, "format": 0.5})
    trends.update(1, {"correct": 0.5, "format": 0.9})  # correctness rose too
    assert trends.events() == []
    spread = ComponentTrends({"a": 0.5, "b": 0.5})
    spread.update(0, {"a": 0.2, "b": 0.2})
    spread.update(1, {"a": 0.5, "b": 0.5})  # 50/50 rise
    assert spread.events() == []
    assert ComponentTrends().events() == []


def test_trends_from_rubric_and_canaries():
    rubric = Rubric([ExactMatch(), ExactMatch(name="canary")], weights={"exact_match": 1, "canary": 0})
    trends = ComponentTrends.from_rubric(rubric, correctness=["exact_match"], canaries=["canary"])
    assert trends.weights == {"exact_match": 1.0, "canary": 0.0}
    trends.update(0, {"exact_match": 0.5, "canary": 0.1})
    trends.update(1, {"exact_match": 0.6, "canary": 0.4})
    events = trends.events()
    assert [e.kind for e in events] == ["canary_moved"]
    assert events[0].data["delta"] == pytest.approx(0.3)
