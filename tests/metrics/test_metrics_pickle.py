"""Rubrics and every built-in component survive pickling and score the same in worker processes."""

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import dspy
import pytest

from metrics import (
    AnswerType,
    Contains,
    Custom,
    ExactMatch,
    FormatValidity,
    Gate,
    LengthPenalty,
    LMJudge,
    NumericMatch,
    Regex,
    Rubric,
    Score,
    as_rubric,
)


def brevity(example, pred, trace=None):
    """A module-level custom metric (picklable by reference)."""
    return (1.0, "") if len(str(pred.get("answer", ""))) <= 5 else (0.0, "too long")


def build_rubric(on_error="raise"):
    return Rubric(
        [
            Gate(NumericMatch("answer"), requires="format"),
            FormatValidity(["answer"]),
            ExactMatch("answer", normalize=True),
            AnswerType("answer", "int"),
            LengthPenalty("answer", max_len=10, width=10),
            Regex("answer", r"^-?\d+$"),
            Contains("answer", gold_field="answer"),
            Custom(brevity),
            LMJudge("Is it correct?", name="judge"),
        ],
        weights={"numeric_match": 4, "format": 1, "length": 0, "judge": 0},
        on_error=on_error,
    )


EXAMPLES = [dspy.Example(question=f"{i} + {i}?", answer=str(2 * i)).with_inputs("question") for i in range(6)]
PREDS = [dspy.Prediction(answer=str(2 * i if i % 2 == 0 else 2 * i + 1)) for i in range(6)]


def test_pickle_round_trip_of_every_component_and_the_rubric():
    rubric = build_rubric()
    for name, comp in rubric.components.items():
        clone = pickle.loads(pickle.dumps(comp))
        assert type(clone) is type(comp) and clone.name == comp.name == name
    clone = pickle.loads(pickle.dumps(rubric))
    assert clone.names == rubric.names and clone.effective_weights == rubric.effective_weights
    assert clone.gates == rubric.gates
    # the judge has weight 0 but still runs: score with a scripted LM in this process
    lm = dspy.utils.DummyLM([{"justification": "ok", "score": "1"}] * 2)
    with dspy.context(lm=lm):
        assert clone(EXAMPLES[0], PREDS[0]) == rubric(EXAMPLES[0], PREDS[0])


def test_pickle_keeps_error_counts_and_makes_a_new_lock():
    rubric = Rubric([ExactMatch(), Custom(brevity)], on_error="zero")
    rubric._error_counts["brevity"] = 3  # simulate earlier failures
    clone = pickle.loads(pickle.dumps(rubric))
    assert clone.error_counts == {"brevity": 3}
    assert clone._lock is not rubric._lock


def score_pair(args):
    rubric, example, pred = args
    return rubric(example, pred)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_process_pool_evaluation_matches_in_process(start_method):
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{start_method} not available")
    # the judge needs an LM: drop it for the worker run (LMs are per process)
    full = build_rubric()
    rubric = Rubric({n: c for n, c in full.components.items() if n != "judge"},
                    weights={"numeric_match": 4, "format": 1, "length": 0}, gates=full.gates)
    expected = [rubric(e, p) for e, p in zip(EXAMPLES, PREDS, strict=True)]
    ctx = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        got = list(pool.map(rubric, EXAMPLES, PREDS))
        via_metric = list(pool.map(rubric.as_dspy_metric(), EXAMPLES, PREDS))
        via_plain = list(pool.map(score_pair, [(as_rubric(brevity), e, p) for e, p in zip(EXAMPLES, PREDS,
                                                                                         strict=True)]))
    assert got == expected
    assert all(isinstance(s, Score) for s in got)
    # even i right (exactly 1.0); odd i off by one: format, answer_type, regex, brevity pass = 4 of weight 10
    assert [s.value for s in got][:2] == [1.0, pytest.approx(0.4)]
    assert via_metric == [s.value for s in expected]
    assert [s.value for s in via_plain] == [1.0] * 6


def refuses(example, pred, trace=None):
    raise ValueError("cannot score this")


def test_component_error_crosses_the_process_boundary():
    from metrics import ComponentError

    rubric = Rubric([ExactMatch("answer"), Custom(refuses)])
    with ProcessPoolExecutor(max_workers=1) as pool, pytest.raises(ComponentError) as info:
        list(pool.map(rubric, EXAMPLES[:1], PREDS[:1]))
    assert info.value.component == "refuses" and "0 + 0?" in info.value.example
    assert "cannot score this" in str(info.value)
