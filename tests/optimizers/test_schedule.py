"""Schedule strings: parsing, canonical spelling, arms, and clear errors."""

from __future__ import annotations

import pytest

from optimizers.schedule import ScheduleError, arm_of, format_schedule, parse_schedule


@pytest.mark.parametrize("text, stages", [
    ("p", ("p",)),
    ("w", ("w",)),
    ("p -> w -> p", ("p", "w", "p")),
    ("p->w->p->w", ("p", "w", "p", "w")),
    ("  P  ->  s ", ("p", "s")),
])
def test_parses_and_round_trips(text, stages):
    assert parse_schedule(text) == stages
    assert parse_schedule(format_schedule(stages)) == stages


@pytest.mark.parametrize("stages, arm", [
    (("p",), "prompt-only"), (("p", "p"), "prompt-only"),
    (("w",), "rl-only"), (("s", "w"), "rl-only"),
    (("p", "w", "p"), "joint"), (("s", "p"), "joint"),
])
def test_arms(stages, arm):
    assert arm_of(stages) == arm


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("p -> -> w", "step 2 .* is empty"),
    ("p -> x", "unknown stage 'x' at step 2.*'p' \\(prompt optimization\\)"),
    ("p, w", "unknown stage 'p, w'"),
])
def test_bad_schedules_say_what_is_wrong(text, message):
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(text)


def test_non_string_is_refused():
    with pytest.raises(ScheduleError, match="string"):
        parse_schedule(["p", "w"])
