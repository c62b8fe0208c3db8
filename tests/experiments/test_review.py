"""The review queue: disagreements first, one keystroke per label, labels written as HUMAN assessments."""

from __future__ import annotations

import io

import dspy
import mlflow
import pytest
from mlflow import MlflowClient

from experiments.review import CORRECTED, LABEL, fetch_items, queue, read_key, review_loop
from experiments.traces import from_prediction, log_traces


@pytest.fixture()
def store(tmp_path, request):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))
    client = MlflowClient(uri)
    return client, client.create_experiment("review", artifact_location=str(tmp_path / "artifacts"))


def _case(i: int, answer: str, gold: str, total: float, components: dict[str, float]):
    example = dspy.Example(question=f"q{i}?", answer=gold, id=f"e{i}").with_inputs("question")
    return from_prediction(example, dspy.Prediction(answer=answer), total, components,
                           {"cotune.run": "r1", "cotune.stage": "1-w"})


def test_the_queue_puts_disagreements_first_then_conflicts_and_labels_land_in_mlflow(store):
    client, experiment = store
    log_traces([
        _case(0, "7", "7", 1.0, {"correct": 1.0, "short": 1.0}),   # all agree: last
        _case(1, "7", "7", 0.5, {"correct": 1.0, "short": 0.0}),   # components conflict
        _case(2, "3", "7", 0.9, {"correct": 0.0, "short": 1.0}),   # the rubric passes a wrong answer: first
    ], experiment)
    mlflow.flush_trace_async_logging(terminate=False)
    items = fetch_items(client, experiment)
    assert [i.tags["cotune.example_id"] for i in queue(items)] == ["e2", "e1", "e0"]
    assert queue(items)[0].disagreement and queue(items)[1].conflict == 1.0

    out = io.StringIO()
    keys = iter("fcq")
    written = review_loop(items, key=lambda: next(keys), ask=lambda prompt: "7", write=out.write, reviewer="ana")
    assert written == 2 and "rubric and gold disagree" in out.getvalue()

    again = {i.tags["cotune.example_id"]: i for i in fetch_items(client, experiment)}
    assert (again["e2"].human, again["e1"].human, again["e0"].human) == (False, False, None)
    assert again["e1"].corrected == "7" and [i.tags["cotune.example_id"] for i in queue(again.values())] == ["e0"]
    human = [a for a in client.get_trace(again["e2"].trace_id).info.assessments if a.source.source_type == "HUMAN"]
    assert [(a.name, a.value, a.source.source_id) for a in human] == [(LABEL, False, "ana")]
    corrected = [a for a in client.get_trace(again["e1"].trace_id).info.assessments if a.name == CORRECTED]
    assert corrected[0].source.source_type == "HUMAN"


def test_a_key_from_a_pipe_is_the_first_character_of_a_line():
    assert read_key(io.StringIO("pass\n")) == "p" and read_key(io.StringIO("")) == "q"


def test_the_queue_goes_to_an_mlflow_review_queue_whose_answers_count_as_labels(store):
    """MLflow's own review queue (local, in the tracking store): the same order, the same questions; an answer given
    there (a HUMAN "label" feedback with the pass/fail question's word) is read back as a label."""
    import mlflow.genai.review_queues as queues
    from mlflow.entities import AssessmentSource

    from experiments.review import enqueue

    client, experiment = store
    log_traces([_case(0, "7", "7", 1.0, {"correct": 1.0, "short": 1.0}),
                _case(2, "3", "7", 0.9, {"correct": 0.0, "short": 1.0})], experiment)
    mlflow.flush_trace_async_logging(terminate=False)
    items = fetch_items(client, experiment)
    queue_id, added = enqueue(experiment, items)
    listed = [i.item_id for i in queues.list_review_queue_items(queue_id)]
    assert added == 2 and sorted(listed) == sorted(i.trace_id for i in queue(items))
    assert enqueue(experiment, items)[0] == queue_id  # the same queue again, not a second one

    wrong = queue(items)[0]  # what a reviewer's answer in the UI writes
    mlflow.log_feedback(trace_id=wrong.trace_id, name=LABEL, value="fail",
                        source=AssessmentSource(source_type="HUMAN", source_id="ana"))
    assert {i.trace_id: i.human for i in fetch_items(client, experiment)}[wrong.trace_id] is False
