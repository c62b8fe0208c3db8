"""Tests for Rubric: weights, gates, logged-only components, feedback, error handling, adapters, as_rubric."""

import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from metrics import (
    ERROR_KEY,
    ComponentError,
    ComponentResult,
    Custom,
    DspyMetric,
    ExactMatch,
    FormatValidity,
    Gate,
    GepaMetric,
    LengthPenalty,
    MetricError,
    NumericMatch,
    Rubric,
    RubricConfigError,
    Score,
    as_rubric,
)


def const(value, feedback=""):
    """A component returning a fixed value (named via the rubric's mapping)."""
    return Custom(lambda e, p, t=None: ComponentResult(value, feedback))


EXAMPLE = dspy.Example(question="What is 6*7?", answer="42").with_inputs("question")


# ------------------------------------------------------------------ weights
def test_equal_weights_by_default():
    rubric = Rubric({"a": const(1.0), "b": const(0.0), "c": const(0.5)})
    score = rubric(EXAMPLE, {})
    assert isinstance(score, Score)
    assert score.value == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3
    assert score.components == {"a": 1.0, "b": 0.0, "c": 0.5}


def test_normalized_dict_weights():
    rubric = Rubric({"a": const(1.0), "b": const(0.0), "c": const(0.5)}, weights={"a": 3, "b": 1, "c": 4})
    assert rubric(EXAMPLE, {}).value == pytest.approx((3 * 1 + 1 * 0 + 4 * 0.5) / 8)  # 0.625
    assert rubric.effective_weights == {"a": 0.375, "b": 0.125, "c": 0.5}
    assert rubric.weights == {"a": 3.0, "b": 1.0, "c": 4.0}


def test_sequence_weights_and_missing_dict_weights_default_to_one():
    comps = {"a": const(1.0), "b": const(0.0)}
    assert Rubric(comps, weights=[1, 3])(EXAMPLE, {}).value == 0.25  # (1*1 + 3*0) / 4
    assert Rubric(comps, weights={"b": 3})(EXAMPLE, {}).value == 0.25


def test_explicit_weights_without_normalization():
    rubric = Rubric({"a": const(1.0), "b": const(0.5)}, weights={"a": 0.25, "b": 0.5}, normalize=False)
    assert rubric(EXAMPLE, {}).value == pytest.approx(0.25 + 0.25)
    with pytest.raises(RubricConfigError, match="sum to <= 1"):
        Rubric({"a": const(1.0), "b": const(0.5)}, weights={"a": 0.8, "b": 0.5}, normalize=False)


def test_weight_zero_components_are_logged_only():
    rubric = Rubric({"correct": const(1.0), "length": const(0.1, "too long")}, weights={"correct": 1, "length": 0})
    score = rubric(EXAMPLE, {})
    assert score.value == 1.0
    assert score.components == {"correct": 1.0, "length": 0.1}
    assert "length (logged only): 0.10 - too long" in score.feedback
    assert "All passed." in score.feedback


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"a": -1}, "finite and >= 0"),
        ({"a": math.nan}, "finite and >= 0"),
        ({"a": 0}, "all weights are 0"),
        ({"zz": 1}, "unknown components"),
        ([1, 2], "1 weights|2 weights"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(RubricConfigError, match=match):
        Rubric({"a": const(1.0)}, weights=weights)


def test_bad_construction():
    with pytest.raises(RubricConfigError, match="at least one component"):
        Rubric([])
    with pytest.raises(RubricConfigError, match="duplicate component name"):
        Rubric([ExactMatch("answer"), ExactMatch("other")])
    with pytest.raises(RubricConfigError, match="on_error"):
        Rubric([ExactMatch()], on_error="ignore")
    with pytest.raises(RubricConfigError, match="must be callables"):
        Rubric([42])
    assert isinstance(RubricConfigError("x"), (MetricError, ValueError))


def test_with_weights_returns_a_retuned_copy():
    rubric = Rubric({"a": const(1.0), "b": const(0.0)}, gates={"a": "b"})
    tuned = rubric.with_weights({"a": 1, "b": 0})
    assert tuned.effective_weights == {"a": 1.0, "b": 0.0}
    assert tuned.gates == rubric.gates
    assert rubric.effective_weights == {"a": 0.5, "b": 0.5}  # original untouched


# ------------------------------------------------------------------ gates
def test_gate_via_mapping_zeroes_and_skips_gated_component():
    calls = []

    def correct(example, pred, trace=None):
        calls.append(1)
        return 1.0

    rubric = Rubric([Custom(correct), FormatValidity(["reasoning", "answer"])], gates={"correct": "format"})
    closed = rubric(EXAMPLE, {"answer": "42"})  # format = 0.5 < 1.0
    assert closed.components == {"correct": 0.0, "format": 0.5}
    assert closed.value == pytest.approx(0.25)
    assert calls == []  # not called while the gate is closed
    assert "[GATED] correct" in closed.feedback and "requires format >= 1, got 0.50" in closed.feedback
    opened = rubric(EXAMPLE, {"answer": "42", "reasoning": "6*7"})
    assert opened.components == {"correct": 1.0, "format": 1.0} and opened.value == 1.0
    assert calls == [1]


def test_gate_object_with_threshold():
    rubric = Rubric([Gate(NumericMatch("answer"), requires="format", threshold=0.5),
                     FormatValidity(["reasoning", "answer"])], weights={"numeric_match": 3, "format": 1})
    assert rubric.gates == {"numeric_match": ("format", 0.5)}
    assert rubric(EXAMPLE, {"answer": "42"}).value == pytest.approx((3 * 1 + 0.5) / 4)  # 0.5 >= 0.5: open
    assert rubric(EXAMPLE, {"reasoning": "x"}).components["numeric_match"] == 0.0


def test_gate_tuple_spec_and_chained_gates():
    rubric = Rubric({"a": const(0.0), "b": const(1.0), "c": const(1.0)}, gates={"b": ("a", 0.0), "c": "b"})
    assert rubric(EXAMPLE, {}).components == {"a": 0.0, "b": 1.0, "c": 1.0}  # threshold 0 always open
    chained = Rubric({"a": const(0.0), "b": const(1.0), "c": const(1.0)}, gates={"b": "a", "c": "b"})
    assert chained(EXAMPLE, {}).components == {"a": 0.0, "b": 0.0, "c": 0.0}  # c sees b's gated value


@pytest.mark.parametrize(
    ("gates", "match"),
    [
        ({"zz": "a"}, "unknown component"),
        ({"a": "zz"}, "not another component"),
        ({"a": "a"}, "not another component"),
        ({"a": ("b", 1.5)}, "threshold"),
        ({"a": "b", "b": "a"}, "cycle"),
    ],
)
def test_bad_gates(gates, match):
    with pytest.raises(RubricConfigError, match=match):
        Rubric({"a": const(1.0), "b": const(1.0)}, gates=gates)


def test_gate_declared_twice_is_an_error():
    with pytest.raises(RubricConfigError, match="gated twice"):
        Rubric([Gate(ExactMatch(), requires="format"), FormatValidity(["answer"])],
               gates={"exact_match": "format"})


# ------------------------------------------------------------------ feedback
def test_feedback_names_failed_components_with_expected_and_got():
    rubric = Rubric([ExactMatch("answer"), FormatValidity(["answer"]), LengthPenalty("answer", max_len=100)])
    score = rubric(EXAMPLE, {"answer": "41"})
    assert score.value == pytest.approx(2 / 3)
    lines = score.feedback.splitlines()
    assert lines[0] == "Total score 0.67. Not passed: exact_match."
    assert "- [FAIL] exact_match (weight 0.33): 0.00 - expected '42', got '41'" in lines
    assert "- [PASS] format (weight 0.33): 1.00" in lines


def test_error_key_prediction_scores_and_explains():
    rubric = Rubric([ExactMatch("answer"), FormatValidity(["answer"])], gates={"exact_match": "format"})
    score = rubric(EXAMPLE, dspy.Prediction(**{ERROR_KEY: "AdapterParseError: no answer field"}))
    assert score.value == 0.0
    assert "program failed: AdapterParseError: no answer field" in score.feedback


# ------------------------------------------------------------------ errors
def boom(example, pred, trace=None):
    raise RuntimeError("kaput")


def nan_metric(example, pred, trace=None):
    return float("nan")


def too_big(example, pred, trace=None):
    return 1.7


def bad_type(example, pred, trace=None):
    return "yes"


@pytest.mark.parametrize(
    ("fn", "problem"),
    [
        (boom, "raised RuntimeError: kaput"),
        (nan_metric, "returned nan"),
        (too_big, "returned 1.7, outside [0, 1]"),
        (bad_type, "raised TypeError: expected a bool"),
    ],
)
def test_component_errors_name_component_and_example(fn, problem):
    rubric = Rubric([ExactMatch("answer"), Custom(fn)])
    with pytest.raises(ComponentError) as info:
        rubric(EXAMPLE, {"answer": "42"})
    err = info.value
    assert err.component == fn.__name__
    assert err.example == "{question='What is 6*7?'}"  # inputs only: the gold answer is not shown
    assert f"component {fn.__name__!r}" in str(err) and "What is 6*7?" in str(err) and problem in str(err)
    assert "on_error='zero'" in str(err)
    assert isinstance(err, MetricError)


def test_component_error_chains_the_original_exception():
    with pytest.raises(ComponentError) as info:
        Rubric([Custom(boom)])(EXAMPLE, {})
    assert isinstance(info.value.__cause__, RuntimeError)


def test_on_error_zero_scores_counts_and_reports():
    rubric = Rubric([ExactMatch("answer"), Custom(boom), Custom(too_big)], on_error="zero")
    score = rubric(EXAMPLE, {"answer": "42"})
    assert score.components == {"exact_match": 1.0, "boom": 0.0, "too_big": 0.0}
    assert score.value == pytest.approx(1 / 3)
    assert "[ERROR] boom" in score.feedback and "kaput" in score.feedback
    rubric(EXAMPLE, {"answer": "42"})
    assert rubric.error_counts == {"boom": 2, "too_big": 2}
    rubric.reset_error_counts()
    assert rubric.error_counts == {}


def test_error_counts_are_thread_safe():
    rubric = Rubric([ExactMatch("answer"), Custom(boom)], on_error="zero")
    barrier = threading.Barrier(8)

    def work(_):
        barrier.wait()
        for _ in range(200):
            rubric(EXAMPLE, {"answer": "42"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert rubric.error_counts == {"boom": 1600}


def test_value_slightly_outside_unit_interval_is_clipped():
    rubric = Rubric({"a": const(1.0 + 1e-12), "b": const(-1e-12)})
    assert rubric(EXAMPLE, {}).components == {"a": 1.0, "b": 0.0}


# ------------------------------------------------------------------ adapters
def test_as_dspy_metric_float_without_trace_bool_with_trace():
    rubric = Rubric([ExactMatch("answer"), FormatValidity(["answer", "reasoning"])])
    metric = rubric.as_dspy_metric()
    assert isinstance(metric, DspyMetric)
    assert metric(EXAMPLE, {"answer": "42"}) == pytest.approx(0.75)
    assert metric(EXAMPLE, {"answer": "42"}, trace=[]) is False  # 0.75 < 1.0
    assert metric(EXAMPLE, {"answer": "42", "reasoning": "r"}, trace=[]) is True
    lenient = rubric.as_dspy_metric(threshold=0.7)
    assert lenient(EXAMPLE, {"answer": "42"}, trace=[("pred", {}, {})]) is True
    assert lenient.__name__ == "rubric"


def test_as_gepa_metric_returns_prediction_with_feedback():
    rubric = Rubric([NumericMatch("answer"), FormatValidity(["answer"])])
    metric = rubric.as_gepa_metric()
    assert isinstance(metric, GepaMetric)
    inspect.signature(metric).bind(None, None, None, None, None)  # what GEPA checks
    out = metric(EXAMPLE, dspy.Prediction(answer="41"), None, "predict", None)
    assert isinstance(out, dspy.Prediction)
    assert out.score == pytest.approx(0.5)
    assert "numeric_match" in out.feedback and "expected 42, got 41" in out.feedback
    assert "Not passed: numeric_match." in out.feedback


def test_reward_is_the_full_score():
    rubric = Rubric([ExactMatch("answer"), LengthPenalty("answer", max_len=1)], weights=[1, 0])
    reward = rubric.reward(EXAMPLE, {"answer": "42"})
    assert reward == rubric(EXAMPLE, {"answer": "42"})
    assert reward.value == 1.0 and reward.components == {"exact_match": 1.0, "length": 0.0}
    assert float(reward) == 1.0


# ------------------------------------------------------------------ as_rubric
def exact(example, pred, trace=None):
    return example.answer == pred.answer


def fraction(example, pred, trace=None):
    return 0.4


def with_feedback(example, pred, trace=None):
    return dspy.Prediction(score=0.3, feedback="needs units")


def test_as_rubric_on_plain_metrics():
    rb = as_rubric(exact)
    assert isinstance(rb, Rubric) and rb.names == ("exact",) and rb.name == "exact"
    assert rb(EXAMPLE, dspy.Prediction(answer="42")).value == 1.0
    assert rb(EXAMPLE, dspy.Prediction(answer="4")).value == 0.0
    assert as_rubric(fraction)(EXAMPLE, {}).value == 0.4
    score = as_rubric(with_feedback)(EXAMPLE, {})
    assert score.value == 0.3 and "needs units" in score.feedback
    assert as_rubric(fraction, name="frac").names == ("frac",)


def test_as_rubric_identity_and_unwrapping():
    rubric = Rubric([ExactMatch("answer")])
    assert as_rubric(rubric) is rubric
    assert as_rubric(rubric.as_dspy_metric()) is rubric
    assert as_rubric(rubric.as_gepa_metric()) is rubric
    assert as_rubric(ExactMatch("answer")).names == ("exact_match",)
    with pytest.raises(RubricConfigError, match="metric callable"):
        as_rubric("exact_match")


def test_nested_rubric_as_component():
    inner = Rubric([ExactMatch("answer"), FormatValidity(["answer", "reasoning"])], name="inner")
    outer = Rubric([inner, LengthPenalty("answer", max_len=10)], weights={"inner": 1, "length": 1})
    score = outer(EXAMPLE, {"answer": "42"})
    assert score.components == {"inner": 0.75, "length": 1.0}
    assert score.value == pytest.approx(0.875)


def test_perfect_score_is_exactly_one_with_awkward_weights():
    comps = {f"c{i}": const(1.0) for i in range(10)}
    normalized = Rubric(comps, weights=[0.1] * 9 + [0.7])
    assert normalized(EXAMPLE, {}).value == 1.0
    explicit = Rubric(comps, weights=[0.1] * 10, normalize=False)  # 0.1 * 10 sums to 0.9999999999999999
    assert explicit.as_dspy_metric()(EXAMPLE, {}, trace=[]) is True
