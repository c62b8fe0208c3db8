"""metrics.call_metric: the one safe call of a user's metric shared by the evaluation and the rollouts."""

from __future__ import annotations

import dspy
import pytest

from metrics import ExactMatch, MetricError, Rubric, Score, call_metric

EXAMPLE = dspy.Example(question="What is the last digit of 1234?", answer="4").with_inputs("question")


def test_a_rubric_gets_the_trace_and_keeps_its_components():
    seen = []

    class Traced(Rubric):
        def reward(self, example, prediction, trace=None):
            seen.append(trace)
            return super().reward(example, prediction, trace)

    score = call_metric(Traced([ExactMatch("answer")]), EXAMPLE, dspy.Prediction(answer="4"), trace=["t"])
    assert seen == [["t"]]
    assert score.value == 1.0 and score.components == {"exact_match": 1.0}


def test_a_plain_metric_gets_no_trace_and_any_answer_shape_is_normalised():
    seen = []

    def metric(example, pred, trace=None):
        seen.append(trace)
        return True

    assert call_metric(metric, EXAMPLE, dspy.Prediction(), trace=["t"]) == Score(1.0)
    assert seen == [None]  # a DSPy metric given a trace answers pass/fail, not a score
    out = call_metric(lambda e, p, t=None: dspy.Prediction(score=0.5, feedback="half"), EXAMPLE, dspy.Prediction())
    assert out == Score(0.5, {}, "half")


@pytest.mark.parametrize("metric, problem", [
    (lambda e, p, t=None: {}["gold"], r"raised KeyError: 'gold' on example \{question='What is the last digit"),
    (lambda e, p, t=None: float("inf"), r"returned inf on example \{question=.*finite number"),
    (lambda e, p, t=None: "yes", r"returned 'yes', not a number, on example \{question="),
], ids=["raises", "inf", "not-a-number"])
def test_a_broken_metric_raises_one_metric_error_naming_the_example(metric, problem):
    with pytest.raises(MetricError, match=problem):
        call_metric(metric, EXAMPLE, dspy.Prediction(answer="4"))
