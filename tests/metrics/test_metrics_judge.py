"""Tests for LMJudge with a scripted DummyLM: score parsing and scaling, caching, deterministic mode, errors."""

import json
import pickle

import dspy
import pytest
from dspy.utils import DummyLM

from metrics import ERROR_KEY, ComponentResult, JudgeError, LMJudge, Rubric, RubricConfigError

EXAMPLE = dspy.Example(question="Pass the salt?", answer="Here you go, please.").with_inputs("question")


def scripted(*answers):
    return DummyLM([{"justification": j, "score": s} for j, s in answers])


def test_parses_score_and_uses_justification_as_feedback():
    lm = scripted(("Polite and helpful.", "0.8"))
    judge = LMJudge("Is the reply polite?", lm=lm)
    assert judge(EXAMPLE, dspy.Prediction(answer="Sure, here it is.")) == ComponentResult(0.8, "Polite and helpful.")
    assert judge.lm_calls == 1 and len(lm.history) == 1


@pytest.mark.parametrize(("raw", "value"), [("1", 0.0), ("3", 0.5), ("4", 0.75), ("5", 1.0), ("4/5", 0.75),
                                             ("Score: 2", 0.25)])
def test_one_to_five_scale_maps_to_unit_interval(raw, value):
    judge = LMJudge("Polite?", lm=scripted(("why", raw)), scale=(1, 5))
    assert judge(EXAMPLE, {"answer": "ok"}).value == pytest.approx(value)


def test_out_of_scale_scores_are_clipped_and_noted():
    result = LMJudge("Polite?", lm=scripted(("very", "7")), scale=(1, 5))(EXAMPLE, {"answer": "ok"})
    assert result.value == 1.0 and "outside 1..5, clipped" in result.feedback


def test_prompt_carries_criterion_inputs_and_response_but_not_gold():
    lm = scripted(("fine", "1"))
    LMJudge("Is the reply polite?", lm=lm)(EXAMPLE, {"answer": "Take it."})
    prompt = "\n".join(m["content"] for m in lm.history[-1]["messages"])
    assert "Is the reply polite?" in prompt and "question: Pass the salt?" in prompt and "Take it." in prompt
    assert "Here you go, please." not in prompt  # gold label not shown (inputs are marked)
    assert "a number from 0 (worst) to 1 (best)" in prompt


def test_explicit_input_fields_and_whole_prediction():
    lm = scripted(("fine", "1"))
    LMJudge("Good?", lm=lm, input_fields=["question", "answer"], field=None)(
        EXAMPLE, dspy.Prediction(reasoning="think", answer="Take it.", **{ERROR_KEY: "hidden"}))
    prompt = "\n".join(m["content"] for m in lm.history[-1]["messages"])
    assert "answer: Here you go, please." in prompt  # reference shown on request
    assert "reasoning: think" in prompt and "answer: Take it." in prompt and "hidden" not in prompt


def test_cache_avoids_second_lm_call():
    lm = scripted(("first", "0.9"), ("second", "0.1"))
    judge = LMJudge("Polite?", lm=lm)
    first = judge(EXAMPLE, {"answer": "please"})
    again = judge(EXAMPLE, {"answer": "please"})
    assert first == again == ComponentResult(0.9, "first")
    assert len(lm.history) == 1 and judge.lm_calls == 1 and judge.cache_hits == 1
    other = judge(EXAMPLE, {"answer": "no"})  # different response: new call
    assert other.value == pytest.approx(0.1) and len(lm.history) == 2 and judge.cache_size == 2


def test_cache_can_be_disabled_and_cleared():
    lm = scripted(("a", "1"), ("b", "0"), ("c", "1"))
    nocache = LMJudge("Polite?", lm=lm, cache=False)
    assert [nocache(EXAMPLE, {"answer": "x"}).value for _ in range(2)] == [1.0, 0.0]
    assert len(lm.history) == 2
    judge = LMJudge("Polite?", lm=scripted(("a", "1"), ("b", "0")))
    judge(EXAMPLE, {"answer": "x"})
    judge.clear_cache()
    assert judge(EXAMPLE, {"answer": "x"}).value == 0.0 and judge.lm_calls == 2


def test_cache_key_depends_on_criterion_inputs_response_and_model():
    judge = LMJudge("Polite?")
    key = judge.cache_key("question: q", "r", "m")
    assert key == LMJudge("Polite?").cache_key("question: q", "r", "m")
    assert len({key, judge.cache_key("question: q2", "r", "m"), judge.cache_key("question: q", "r2", "m"),
                judge.cache_key("question: q", "r", "m2"), LMJudge("Kind?").cache_key("question: q", "r", "m")}) == 5


def test_cache_persists_to_json(tmp_path):
    path = tmp_path / "judge" / "cache.json"
    lm = scripted(("persisted", "0.6"))
    LMJudge("Polite?", lm=lm, cache_path=path)(EXAMPLE, {"answer": "please"})
    data = json.loads(path.read_text())
    assert list(data.values()) == [[0.6, "persisted"]]
    fresh_lm = scripted(("should not be used", "0.0"))
    reloaded = LMJudge("Polite?", lm=fresh_lm, cache_path=path)
    assert reloaded(EXAMPLE, {"answer": "please"}) == ComponentResult(0.6, "persisted")
    assert len(fresh_lm.history) == 0 and reloaded.cache_hits == 1
    assert not list(path.parent.glob("*.tmp"))  # written atomically, no leftovers


def test_corrupt_cache_file_raises_actionable_error(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.raises(JudgeError, match="delete it"):
        LMJudge("Polite?", cache_path=path)


def test_deterministic_mode_sends_temperature_zero():
    lm = scripted(("a", "1"), ("b", "1"))
    LMJudge("Polite?", lm=lm)(EXAMPLE, {"answer": "x"})
    assert lm.history[-1]["kwargs"] == {"temperature": 0.0}
    LMJudge("Polite?", lm=lm, deterministic=False)(EXAMPLE, {"answer": "y"})
    assert "temperature" not in lm.history[-1]["kwargs"]


def test_judge_call_stays_out_of_the_program_trace(caplog):
    trace = []
    with dspy.context(trace=trace):
        LMJudge("Polite?", lm=scripted(("a", "1")))(EXAMPLE, {"answer": "x"})
        dspy.Predict("question -> answer")(question="q", lm=DummyLM([{"answer": "y"}]))  # the program's own call
    assert len(trace) == 1 and trace[0][2].answer == "y"  # only the program's call; the caller's trace goes on
    assert "not in signature" not in caplog.text  # no warning per judge call


def test_uses_settings_lm_when_none_given():
    lm = scripted(("from context", "1"))
    judge = LMJudge("Polite?")
    with dspy.context(lm=lm):
        assert judge(EXAMPLE, {"answer": "x"}) == ComponentResult(1.0, "from context")
    assert len(lm.history) == 1


def test_no_lm_raises_judge_error():
    with dspy.context(lm=None), pytest.raises(JudgeError, match="dspy.configure"):
        LMJudge("Polite?")(EXAMPLE, {"answer": "x"})


def test_empty_or_failed_response_scores_zero_without_calling():
    lm = scripted(("unused", "1"))
    judge = LMJudge("Polite?", lm=lm)
    assert judge(EXAMPLE, {"answer": "  "}).value == 0.0
    failed = judge(EXAMPLE, {ERROR_KEY: "timeout"})
    assert failed.value == 0.0 and "program failed: timeout" in failed.feedback
    assert len(lm.history) == 0


def test_unparseable_score_is_a_component_error_in_a_rubric():
    judge = LMJudge("Polite?", lm=scripted(("hmm", "excellent"), ("hmm", "great")))
    with pytest.raises(JudgeError, match="no number"):
        judge(EXAMPLE, {"answer": "x"})
    rubric = Rubric([judge], on_error="zero")
    assert rubric(EXAMPLE, {"answer": "y"}).value == 0.0 and rubric.error_counts == {"judge": 1}


def test_bad_config():
    with pytest.raises(RubricConfigError):
        LMJudge("")
    with pytest.raises(RubricConfigError):
        LMJudge("Polite?", scale=(5, 1))


def test_judge_in_a_rubric_gives_feedback_and_pickles():
    judge = LMJudge("Polite?", lm=scripted(("Rude.", "0")), name="polite")
    rubric = Rubric([judge])
    score = rubric(EXAMPLE, {"answer": "no"})
    assert score.components == {"polite": 0.0} and "Rude." in score.feedback
    clone = pickle.loads(pickle.dumps(LMJudge("Polite?", cache_path=None)))
    assert clone.criterion == "Polite?" and clone.cache_size == 0


def test_a_rubric_names_its_judge_components_so_tracking_logs_them_as_llm_judge():
    from metrics import ExactMatch

    rubric = Rubric([ExactMatch("answer"), LMJudge("Polite?", lm=scripted(("ok", "1")), name="polite")])
    assert rubric.judges == ("polite",) and Rubric([ExactMatch("answer")]).judges == ()
