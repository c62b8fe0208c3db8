"""End-to-end: the same rubric drives dspy.Evaluate and BootstrapFewShot on DummyLM-backed programs.

Also runs every docstring example in the package, so the documented API cannot drift from the code.
"""

import doctest
import importlib
import pkgutil

import dspy
import pytest
from dspy.utils import DummyLM
from dspy.utils.exceptions import AdapterParseError

import metrics
from metrics import ERROR_KEY, ExactMatch, FormatValidity, LengthPenalty, NumericMatch, Rubric


class QA(dspy.Signature):
    """Answer the arithmetic question with a number."""

    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: str = dspy.OutputField()


DEVSET = [
    dspy.Example(question="What is 2 + 2?", answer="4").with_inputs("question"),
    dspy.Example(question="What is 3 + 5?", answer="8").with_inputs("question"),
    dspy.Example(question="What is 9 - 1?", answer="8").with_inputs("question"),
    dspy.Example(question="What is 7 + 6?", answer="13").with_inputs("question"),
]

# keyed by question text (DummyLM's dict mode): two right, one wrong, one without reasoning
ANSWERS = {
    "What is 2 + 2?": {"reasoning": "2 plus 2", "answer": "4"},
    "What is 3 + 5?": {"reasoning": "3 plus 5", "answer": "The answer is 8."},
    "What is 9 - 1?": {"reasoning": "9 minus 1", "answer": "7"},
    "What is 7 + 6?": {"reasoning": "", "answer": "13"},
}


def make_rubric():
    return Rubric(
        [NumericMatch("answer"), FormatValidity(["reasoning", "answer"]), LengthPenalty("answer", max_len=40)],
        weights={"numeric_match": 3, "format": 1, "length": 0},
        gates={"numeric_match": ("format", 0.5)},
    )


def test_rubric_as_metric_in_dspy_evaluate():
    rubric = make_rubric()
    program = dspy.Predict(QA)
    lm = DummyLM(ANSWERS)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        result = dspy.Evaluate(devset=DEVSET, metric=rubric.as_dspy_metric(), num_threads=2, max_errors=0)(program)
    scores = {ex.question: s for ex, _, s in result.results}
    # 2+2 right and formatted; 3+5 right (number parsed from prose); 9-1 wrong; 7+6 right but reasoning missing
    assert scores == {"What is 2 + 2?": 1.0, "What is 3 + 5?": 1.0, "What is 9 - 1?": 0.25,
                      "What is 7 + 6?": pytest.approx((3 + 0.5) / 4)}
    assert result.score == pytest.approx(100 * (1 + 1 + 0.25 + 0.875) / 4, abs=0.01)  # Evaluate rounds
    preds = {ex.question: p for ex, p, _ in result.results}
    score = rubric(DEVSET[2], preds["What is 9 - 1?"])
    assert score.components == {"numeric_match": 0.0, "format": 1.0, "length": 1.0}
    assert "expected 8, got 7" in score.feedback


class Rollout(dspy.Module):
    """What the rollout code does: turn a parse failure into a scored prediction carrying ERROR_KEY."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict(QA)

    def forward(self, question):
        try:
            return self.predict(question=question)
        except AdapterParseError as e:
            return dspy.Prediction(**{ERROR_KEY: f"{type(e).__name__}: {str(e)[:60]}"})


def test_parse_failures_reach_the_rubric_as_format_failures():
    lm = DummyLM({"What is 2 + 2?": {"answer": "4"}})  # missing "reasoning": the ChatAdapter cannot parse it
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        pred = Rollout()(question="What is 2 + 2?")
    assert ERROR_KEY in pred
    score = make_rubric().as_gepa_metric()(DEVSET[0], pred)
    assert score.score == 0.0
    assert "program failed: AdapterParseError" in score.feedback and "[GATED] numeric_match" in score.feedback


def test_bootstrap_fewshot_gets_a_bool_and_keeps_only_passing_demos():
    rubric = Rubric([ExactMatch("answer"), FormatValidity(["reasoning", "answer"])])
    metric = rubric.as_dspy_metric()
    seen = []

    def spy(example, pred, trace=None):
        out = metric(example, pred, trace)
        seen.append((trace is not None, out))
        return out

    answers = {
        "What is 2 + 2?": {"reasoning": "2 plus 2", "answer": "4"},
        "What is 3 + 5?": {"reasoning": "3 plus 5", "answer": "9"},
    }
    with dspy.context(lm=DummyLM(answers), adapter=dspy.ChatAdapter()):
        compiled = dspy.BootstrapFewShot(metric=spy, max_bootstrapped_demos=2, max_labeled_demos=0,
                                         max_rounds=1).compile(dspy.Predict(QA), trainset=DEVSET[:2])
    assert seen and all(with_trace and isinstance(out, bool) for with_trace, out in seen)
    demos = compiled.demos
    assert [d.question for d in demos] == ["What is 2 + 2?"]


def test_docstring_examples():
    failures = 0
    for info in pkgutil.iter_modules(metrics.__path__):
        module = importlib.import_module(f"metrics.{info.name}")
        failures += doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed
    failures += doctest.testmod(metrics).failed
    assert failures == 0
