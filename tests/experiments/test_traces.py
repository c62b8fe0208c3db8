"""Rollouts and val predictions as MLflow traces: spans per LM call and tool call, rubric feedback, gold expectation.

Runs a short ``p -> w`` on the tiny model with :class:`MlflowTracking` and reads the traces back with MLflow's own
search API (the review queue and calibration read them the same way).
"""

from __future__ import annotations

import dspy
import mlflow
import pytest
from mlflow import MlflowClient

from experiments.traces import DATA_SOURCE_ID, RUBRIC_SOURCE_ID, TraceCase, log_traces
from experiments.tracking import MlflowTracking, TrackingError
from tests.experiments.test_tracking import one_thread, run  # noqa: F401 - one_thread is a fixture


def _assessments(trace) -> dict[str, tuple]:
    return {a.name: (a.value, a.source.source_type, a.source.source_id) for a in trace.info.assessments}


@pytest.fixture
def store(tmp_path, request) -> str:
    """A fresh sqlite store as the process's tracking URI (traces are written there), put back afterwards."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))
    return uri


@pytest.mark.usefixtures("one_thread")
def test_a_run_logs_a_sample_of_rollouts_and_val_predictions_as_traces(fresh_policy, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracking(uri, "traces-test", traces_per_stage=3)
    result = run(fresh_policy, tmp_path, "p -> w", [tracker], budget=192)
    experiment = MlflowClient(uri).get_experiment_by_name("traces-test").experiment_id
    assert mlflow.get_tracking_uri() != uri  # the process's URI is put back after the run
    traces = MlflowClient(uri).search_traces(locations=[experiment])
    assert len({t.info.trace_id for t in traces}) == len(traces) == 12  # seeded runs once drew the same trace ids
    by_stage: dict[tuple[str, str], list] = {}
    for trace in traces:
        tags = trace.info.tags
        assert tags["cotune.run"] == tracker.run_id and tags["cotune.seed"] == "0" and tags["cotune.example_id"]
        by_stage.setdefault((tags["cotune.stage"], tags["cotune.source"]), []).append(trace)
    # 3 val predictions after every stage, 3 rollouts of the weight stage (3 different examples of its first step)
    assert {k: len(v) for k, v in by_stage.items()} == {("0-baseline", "eval"): 3, ("1-p", "eval"): 3,
                                                        ("2-w", "eval"): 3, ("2-w", "rollout"): 3}
    rollouts = by_stage[("2-w", "rollout")]
    assert len({t.info.tags["cotune.example_id"] for t in rollouts}) == 3
    for trace in rollouts:
        assert trace.info.tags["cotune.step"] == "1"
        calls = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
        assert len(calls) == 1 and calls[0].name == "0:self" and calls[0].attributes["completion_tokens"] >= 1
        assert calls[0].inputs["messages"][0]["role"] == "system" and "completion" in calls[0].outputs
        scores = _assessments(trace)
        assert scores["reward"][1:] == ("CODE", RUBRIC_SOURCE_ID) and {"correct", "format"} <= set(scores)
        assert scores["answer"][1:] == ("CODE", DATA_SOURCE_ID)  # the gold answer, an expectation
        assert 0.0 <= scores["reward"][0] <= 1.0
    stage_runs = {r.name: r.val_score for r in result.history}
    assert set(stage_runs) == {"0-baseline", "1-p", "2-w"}
    # the same val examples after every stage, so one question can be followed through the run
    eval_ids = [sorted(t.info.tags["cotune.example_id"] for t in by_stage[(s, "eval")]) for s in stage_runs]
    assert eval_ids[0] == eval_ids[1] == eval_ids[2]
    w_run = MlflowClient(uri).get_run(tracker.stage_runs[2])
    assert w_run.data.metrics["traces"] == 6 and w_run.data.metrics["trace_seconds"] > 0


def _trace_tags(policy, tmp_path, schedule: str, per_stage: int) -> list[dict[str, str]]:
    """Run ``schedule`` on 32 rollouts with ``per_stage`` traces per stage; the tags of every trace it logged."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(policy, tmp_path, schedule, [MlflowTracking(uri, "t", traces_per_stage=per_stage)], budget=32)
    experiment = MlflowClient(uri).get_experiment_by_name("t").experiment_id
    return [t.info.tags for t in MlflowClient(uri).search_traces(locations=[experiment])]


@pytest.mark.usefixtures("one_thread")
def test_traces_off_logs_none(fresh_policy, tmp_path):
    assert _trace_tags(fresh_policy, tmp_path, "w", 0) == []


@pytest.mark.usefixtures("one_thread")
def test_a_self_training_stage_logs_its_sampled_runs_as_traces(fresh_policy, tmp_path):
    rollouts = [t for t in _trace_tags(fresh_policy, tmp_path, "s", 2) if t["cotune.source"] == "rollout"]
    assert len(rollouts) == 2 and {(t["cotune.stage"], t["cotune.step"]) for t in rollouts} == {("1-s", "0")}
    assert len({t["cotune.example_id"] for t in rollouts}) == 2


def test_a_bad_sample_size_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="traces_per_stage must be an int >= 0"):
        MlflowTracking(f"sqlite:///{tmp_path / 'm.db'}", "x", traces_per_stage=-1)


def test_tool_calls_become_tool_spans_with_their_errors(tmp_path, store):
    """A ReAct trajectory's tool calls are spans too; a failed one is an ERROR span carrying DSPy's message."""
    uri = store
    experiment = MlflowClient(uri).create_experiment("tools", artifact_location=str(tmp_path / "artifacts"))
    from experiments.traces import from_prediction

    trajectory = {"tool_name_0": "lookup", "tool_args_0": {"entity": "Vialem"}, "observation_0": "founded 1990",
                  "tool_name_1": "calculator", "tool_args_1": {"expression": "1990-"},
                  "observation_1": "Execution error in calculator: bad expression"}
    example = dspy.Example(question="When?", answer="1990", id="q7").with_inputs("question")
    case = from_prediction(example, dspy.Prediction(answer="1990", trajectory=trajectory), 0.5,
                           {"correct": 1.0, "tool_validity": 0.5}, {"cotune.stage": "0-baseline"})
    assert isinstance(case, TraceCase) and case.tags["cotune.example_id"] == "q7"
    (trace_id,) = log_traces([case], experiment)
    mlflow.flush_trace_async_logging(terminate=False)
    trace = mlflow.get_trace(trace_id)
    tools = [s for s in trace.data.spans if s.span_type == "TOOL"]
    assert [s.name for s in tools] == ["0:lookup", "1:calculator"]
    assert tools[0].status.status_code == "OK" and tools[1].status.status_code == "ERROR"
    assert tools[1].attributes["error"].startswith("Execution error in calculator")
    assert _assessments(trace)["tool_validity"][0] == 0.5 and _assessments(trace)["answer"][0] == "1990"


def test_an_lm_judge_component_is_an_llm_judge_assessment_and_review_reads_it(tmp_path, store):
    from experiments.review import fetch_items

    uri = store
    experiment = MlflowClient(uri).create_experiment("judged", artifact_location=str(tmp_path / "artifacts"))
    case = TraceCase(name="eval", inputs={"question": "Hi?"}, outputs={"answer": "Hello."}, expected={}, total=0.9,
                     components={"correct": 1.0, "polite": 0.75}, tags={"cotune.run": "r1", "cotune.example_id": "q1"})
    (trace_id,) = log_traces([case], experiment, judges=("polite",))
    mlflow.flush_trace_async_logging(terminate=False)
    scores = _assessments(mlflow.get_trace(trace_id))
    assert scores["polite"] == (0.75, "LLM_JUDGE", RUBRIC_SOURCE_ID) and scores["correct"][1] == "CODE"
    (item,) = fetch_items(MlflowClient(uri), experiment)
    assert item.components == {"correct": 1.0, "polite": 0.75} and item.total == 0.9


def test_mlflow_contract_assessments_on_a_live_trace_are_written_with_it(tmp_path, store):
    """experiments.traces._attach relies on MLflow 3.17 internals (InMemoryTraceManager, the store writing a trace's
    assessments when it exports it). If an MLflow upgrade changes that, this test names it."""
    from experiments.traces import _attach

    uri = store
    experiment = MlflowClient(uri).create_experiment("contract", artifact_location=str(tmp_path / "artifacts"))
    from mlflow.entities import AssessmentSource, Feedback

    root = mlflow.start_span_no_context("contract", experiment_id=experiment)
    _attach(root, [Feedback(name="reward", value=0.25, source=AssessmentSource(source_type="CODE", source_id="t"),
                            trace_id=root.trace_id)])
    root.end()
    mlflow.flush_trace_async_logging(terminate=False)
    (found,) = [(a.name, a.value) for a in MlflowClient(uri).get_trace(root.trace_id).info.assessments]
    assert found == ("reward", 0.25)
