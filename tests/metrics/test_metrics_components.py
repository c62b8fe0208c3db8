"""Hand-computed scores for every built-in component (except the LM judge, see test_metrics_judge.py)."""

import sys

import dspy
import pytest

from metrics import (
    ERROR_KEY,
    AnswerType,
    ComponentResult,
    Contains,
    Custom,
    ExactMatch,
    FormatValidity,
    LengthPenalty,
    NumericMatch,
    Regex,
    RubricConfigError,
    Score,
)


def ex(**kw):
    return dspy.Example(**kw).with_inputs("question")


def pred(**kw):
    return dspy.Prediction(**kw)


# ------------------------------------------------------------------ ExactMatch
def test_exact_match_plain():
    em = ExactMatch("answer")
    assert em(ex(question="q", answer="Paris"), pred(answer="Paris")) == ComponentResult(1.0, "")
    assert em(ex(question="q", answer="Paris"), pred(answer="  Paris\n")).value == 1.0  # surrounding whitespace
    result = em(ex(question="q", answer="Paris"), pred(answer="paris"))
    assert result.value == 0.0
    assert result.feedback == "expected 'Paris', got 'paris'"


@pytest.mark.parametrize(
    ("gold", "got", "value"),
    [
        ("Paris", "paris", 1.0),
        ("The Eiffel Tower", "eiffel   tower.", 1.0),
        ("an apple", "Apple!", 1.0),
        ("Paris", "Paris, France", 0.0),
        (["NYC", "New York City"], "new york city", 1.0),  # any of several gold answers
        (["NYC", "New York City"], "Boston", 0.0),
    ],
)
def test_exact_match_normalized(gold, got, value):
    em = ExactMatch("answer", normalize=True)
    assert em({"answer": gold}, {"answer": got}).value == value


def test_exact_match_gold_field_and_missing_fields():
    em = ExactMatch("prediction", gold_field="label")
    assert em({"label": "yes"}, {"prediction": "yes"}).value == 1.0
    missing = em({"label": "yes"}, {})
    assert missing.value == 0.0 and "no field 'prediction'" in missing.feedback
    failed = em({"label": "yes"}, {ERROR_KEY: "AdapterParseError"})
    assert "program failed: AdapterParseError" in failed.feedback
    with pytest.raises(KeyError, match="no gold field 'label'"):
        em({}, {"prediction": "yes"})


# ------------------------------------------------------------------ NumericMatch
@pytest.mark.parametrize(
    ("gold", "got", "value"),
    [
        ("1234", "The total is $1,234.", 1.0),
        (1234, "1,234.0", 1.0),
        ("-3", "minus: -3", 1.0),
        ("1000", "1e3", 1.0),
        ("0.75", "3/4", 1.0),
        ("42", "41", 0.0),
        ("42", 42, 1.0),
    ],
)
def test_numeric_match(gold, got, value):
    assert NumericMatch("answer")({"answer": gold}, {"answer": got}).value == value


def test_numeric_match_tolerances_and_feedback():
    assert NumericMatch("answer", rel_tol=0.1)({"answer": "100"}, {"answer": "91"}).value == 1.0
    assert NumericMatch("answer", rel_tol=0.1)({"answer": "100"}, {"answer": "89"}).value == 0.0
    assert NumericMatch("answer", abs_tol=0.5)({"answer": "10"}, {"answer": "10.4"}).value == 1.0
    wrong = NumericMatch("answer")({"answer": "42"}, {"answer": "41"})
    assert wrong.feedback == "expected 42, got 41 (parsed from '41')"
    unparsed = NumericMatch("answer")({"answer": "42"}, {"answer": "forty-two"})
    assert unparsed.value == 0.0
    assert unparsed.feedback == "could not parse a number from 'forty-two'; expected 42"


def test_numeric_match_bad_gold_and_bad_config():
    with pytest.raises(ValueError, match="holds no number"):
        NumericMatch("answer")({"answer": "n/a"}, {"answer": "1"})
    with pytest.raises(RubricConfigError):
        NumericMatch("answer", rel_tol=-1)


# ------------------------------------------------------------------ FormatValidity
def test_format_validity_partial_credit():
    fv = FormatValidity(["reasoning", "answer", "confidence"])
    assert fv({}, pred(reasoning="r", answer="a", confidence="0.9")).value == 1.0
    partial = fv({}, pred(reasoning="r", answer="  ", confidence=None))
    assert partial.value == pytest.approx(1 / 3)
    assert partial.feedback == "missing or empty output fields: answer, confidence (1 of 3 parsed)"


def test_format_validity_error_key():
    fv = FormatValidity(["reasoning", "answer"])
    result = fv({}, {ERROR_KEY: "AdapterParseError: missing [[ ## answer ## ]]", "reasoning": "partial"})
    assert result.value == 0.5
    assert "program failed: AdapterParseError: missing [[ ## answer ## ]]" in result.feedback


def test_format_validity_uses_example_labels():
    fv = FormatValidity()
    example = dspy.Example(question="q", answer="a", rationale="r").with_inputs("question")
    assert fv(example, pred(answer="x")).value == 0.5
    with pytest.raises(ValueError, match="with_inputs"):
        fv({"answer": "a"}, pred(answer="x"))
    with pytest.raises(RubricConfigError):
        FormatValidity([])


# ------------------------------------------------------------------ AnswerType
@pytest.mark.parametrize(
    ("kind", "value", "ok"),
    [
        ("int", "42", True),
        ("int", " -7 ", True),
        ("int", "1,234", True),
        ("int", 5, True),
        ("int", "4.2", False),
        ("int", "forty", False),
        ("int", True, False),
        ("float", "4.2", True),
        ("float", "1e-3", True),
        ("float", 3, True),
        ("float", "nan", False),
        ("float", "inf", False),
        ("float", "x", False),
        ("json", '{"a": 1}', True),
        ("json", "[1, 2]", True),
        ("json", {"a": 1}, True),
        ("json", "{'a': 1}", False),
        ("json", "not json", False),
    ],
)
def test_answer_type(kind, value, ok):
    assert AnswerType("answer", kind)({}, {"answer": value}).value == (1.0 if ok else 0.0)


def test_answer_type_choice():
    at = AnswerType("answer", "choice", choices=["Yes", "No"])
    assert at({}, {"answer": " yes "}).value == 1.0
    wrong = at({}, {"answer": "maybe"})
    assert wrong.value == 0.0 and wrong.feedback == "expected one of ['Yes', 'No'], got 'maybe'"
    with pytest.raises(RubricConfigError, match="choices"):
        AnswerType("answer", "choice")
    with pytest.raises(RubricConfigError, match="kind"):
        AnswerType("answer", "date")


SCHEMA = {
    "type": "object",
    "required": ["city"],
    "properties": {"city": {"type": "string"}, "pop": {"type": "integer"}},
}


@pytest.mark.parametrize("use_jsonschema", [True, False])
def test_answer_type_json_schema(monkeypatch, use_jsonschema):
    if use_jsonschema:
        pytest.importorskip("jsonschema")
    else:
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` raise ImportError
    at = AnswerType("answer", "json", schema=SCHEMA)
    assert at({}, {"answer": '{"city": "Oslo", "pop": 700000}'}).value == 1.0
    missing = at({}, {"answer": '{"pop": 1}'})
    assert missing.value == 0.0 and "city" in missing.feedback and missing.feedback.startswith("invalid JSON for")
    wrong_type = at({}, {"answer": '{"city": "Oslo", "pop": "many"}'})
    assert wrong_type.value == 0.0 and "pop" in wrong_type.feedback


def test_answer_type_json_uses_jsonschema_when_importable(monkeypatch):
    calls = []

    class FakeValidator:
        def __init__(self, schema):
            calls.append(schema)

        def iter_errors(self, data):
            return iter([])

    fake = type(sys)("jsonschema")
    fake.validators = type(sys)("jsonschema.validators")
    fake.validators.validator_for = lambda schema: FakeValidator
    monkeypatch.setitem(sys.modules, "jsonschema", fake)
    assert AnswerType("answer", "json", schema=SCHEMA)({}, {"answer": "{}"}).value == 1.0  # fake says valid
    assert calls == [SCHEMA]


# ------------------------------------------------------------------ LengthPenalty
@pytest.mark.parametrize(
    ("n", "value"),
    [(0, 0.0), (5, 0.5), (10, 1.0), (15, 1.0), (20, 1.0), (25, 0.5), (30, 0.0), (100, 0.0)],
)
def test_length_penalty_chars(n, value):
    pen = LengthPenalty("answer", max_len=20, min_len=10, width=10)
    assert pen({}, {"answer": "x" * n}).value == pytest.approx(value)


def test_length_penalty_default_width_words_and_feedback():
    pen = LengthPenalty("answer", max_len=4, unit="words")  # width defaults to max_len
    assert pen({}, {"answer": "a b c d"}).value == 1.0
    six = pen({}, {"answer": "a b c d e f"})
    assert six.value == pytest.approx(0.5)
    assert six.feedback == "6 words, above the maximum of 4"
    assert pen({}, {"answer": "a " * 8}).value == 0.0
    low = LengthPenalty("answer", min_len=4)({}, {"answer": "ab"})
    assert low.value == pytest.approx(0.5) and low.feedback == "2 chars, below the minimum of 4"
    assert LengthPenalty("answer", max_len=3)({}, {}).value == 1.0  # missing = length 0, inside [0, 3]


def test_length_penalty_config_errors():
    with pytest.raises(RubricConfigError):
        LengthPenalty("answer", max_len=2, min_len=5)
    with pytest.raises(RubricConfigError):
        LengthPenalty("answer", max_len=2, width=0)
    with pytest.raises(RubricConfigError):
        LengthPenalty("answer", unit="tokens")


# ------------------------------------------------------------------ Regex / Contains
def test_regex():
    assert Regex("answer", r"\d+")({}, {"answer": "it is 42"}).value == 1.0
    assert Regex("answer", r"\d+", fullmatch=True)({}, {"answer": "it is 42"}).value == 0.0
    assert Regex("answer", r"^yes$", flags=2)({}, {"answer": "YES"}).value == 1.0  # re.IGNORECASE
    miss = Regex("answer", r"^\d+$")({}, {"answer": "abc"})
    assert miss.feedback == "'abc' does not match /^\\d+$/"
    with pytest.raises(RubricConfigError, match="does not compile"):
        Regex("answer", "(")


def test_contains():
    assert Contains("answer", "Paris")({}, {"answer": "It is Paris."}).value == 1.0
    assert Contains("answer", "paris")({}, {"answer": "It is Paris."}).value == 0.0
    assert Contains("answer", "paris", case_sensitive=False)({}, {"answer": "It is Paris."}).value == 1.0
    assert Contains("reply", gold_field="answer")({"answer": "42"}, {"reply": "so: 42!"}).value == 1.0
    assert Contains("reply", gold_field="answer")({"answer": "42"}, {"reply": "so: 41"}).feedback == (
        "expected '42' in 'so: 41'")
    with pytest.raises(RubricConfigError):
        Contains("answer")


# ------------------------------------------------------------------ Custom
def metric_bool(example, pred, trace=None):
    return example["answer"] == pred["answer"]


def metric_two_args(example, pred):
    return 0.25


def metric_tuple(example, pred, trace=None):
    return 0.5, "half right"


def metric_prediction(example, pred, trace=None):
    return dspy.Prediction(score=0.75, feedback="mostly")


def test_custom_return_types():
    assert Custom(metric_bool)({"answer": "a"}, {"answer": "a"}) == ComponentResult(1.0, "")
    assert Custom(metric_bool)({"answer": "a"}, {"answer": "b"}).value == 0.0
    assert Custom(metric_two_args)({}, {}).value == 0.25
    assert Custom(metric_tuple)({}, {}) == ComponentResult(0.5, "half right")
    assert Custom(metric_prediction)({}, {}) == ComponentResult(0.75, "mostly")
    assert Custom(lambda e, p, t=None: Score(0.2, {}, "nested"))({}, {}) == ComponentResult(0.2, "nested")


def test_custom_names_and_trace_passing():
    seen = []

    def spy(example, pred, trace=None):
        seen.append(trace)
        return 1.0

    assert Custom(metric_bool).name == "metric_bool"
    assert Custom(lambda e, p: 1.0).name == "custom"
    assert Custom(metric_bool, name="em").name == "em"
    Custom(spy)({}, {}, trace=["t"])
    assert seen == [["t"]]
    with pytest.raises(TypeError, match="expected a bool"):
        Custom(lambda e, p: "yes")({}, {})
    with pytest.raises(RubricConfigError):
        Custom("not callable")


def test_every_builtin_has_a_name():
    comps = [ExactMatch(), NumericMatch(), FormatValidity(["a"]), AnswerType(), LengthPenalty(), Regex("a", "x"),
             Contains("a", "x"), Custom(metric_bool)]
    assert [c.name for c in comps] == ["exact_match", "numeric_match", "format", "answer_type", "length", "regex",
                                       "contains", "metric_bool"]
    assert "ExactMatch(field='answer'" in repr(comps[0])
