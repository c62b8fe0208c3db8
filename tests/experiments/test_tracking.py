"""MLflow tracking of optimize(): parent + nested stage runs, rollouts on the x-axis, FAILED/KILLED on errors."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow import MlflowClient

from experiments.tracking import MlflowTracking, TrackingError, check_tracking_uri
from optimizers import OptimizeCallback, optimize
from programs.tasks import last_digit
from tests.experiments.helpers import REPO, free_port

WEIGHTS = {"learning_rate": 5e-4, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}


@pytest.fixture()
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 intra-op threads on 2 cores make the engine crawl for its first minute
    yield
    torch.set_num_threads(previous)


def run(policy, tmp_path, schedule, callbacks, budget=96, resume=False):
    return optimize(last_digit.predict_program(), last_digit.load("train", 16), last_digit.load("val", 12),
                    metric=last_digit.rubric(), policy=policy, schedule=schedule,
                    prompt={"num_candidate_programs": 1, "max_bootstrapped_demos": 1, "max_labeled_demos": 1},
                    weights=WEIGHTS, budget=budget, seed=0, output_dir=tmp_path / "run", progress=False, resume=resume,
                    callbacks=callbacks, tags={"task": "last_digit"})


def test_parent_and_nested_stage_runs(fresh_policy, tmp_path, one_thread):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracking(uri, "tracking-test", tags={"experiment": "t"})
    result = run(fresh_policy, tmp_path, "p -> w", [tracker], budget=192)
    client = MlflowClient(uri)
    parent = client.get_run(tracker.run_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and parent.info.run_name == "joint-seed0"
    assert (tags["arm"], tags["schedule"], tags["seed"], tags["task"]) == ("joint", "p -> w", "0", "last_digit")
    assert tags["model_hash"] and tags["cotune.kind"] == "run" and tags["cotune.outcome"] == "completed"
    params = parent.data.params
    assert params["weights.learning_rate"] == "0.0005" and params["lora.r"] == "16" and params["budget.rollouts"] == "192"
    assert params["schedule"] == "p -> w" and params["base_fingerprint"] == fresh_policy.base_fingerprint

    # val score after every stage at step = rollouts spent so far
    history = client.get_metric_history(tracker.run_id, "val_score")
    assert [(h.step, h.value) for h in history] == [(r.total_spend["rollouts"], r.val_score) for r in result.history]
    assert parent.data.metrics["final_val_score"] == result.val_score

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["0-baseline", "1-p", "2-w"]
    assert all(c.info.status == "FINISHED" for c in children)
    w = by_name["2-w"]
    steps = client.get_metric_history(w.info.run_id, "reward_mean")
    p_spend = result.history[1].total_spend["rollouts"]
    assert len(steps) == result.history[2].details["steps"] and steps[0].step == p_spend + 16
    for key in ("reward_std", "reward/correct", "reward/format", "parse_failure_rate", "tokens_generated"):
        assert key in w.data.metrics
    artifacts = {a.path for a in client.list_artifacts(w.info.run_id)}
    assert {"program.json", "predictions.jsonl", "record.json", "adapter"} <= artifacts
    assert "adapter/adapter_config.json" in {a.path for a in client.list_artifacts(w.info.run_id, "adapter")}
    assert {"manifest.json", "best", "run.json"} <= {a.path for a in client.list_artifacts(tracker.run_id)}


class Crash(OptimizeCallback):
    def __init__(self, error: BaseException, at_step: int, in_stage: int = 1) -> None:
        self.error, self.at_step, self.in_stage = error, at_step, in_stage

    def on_step(self, run, index, metrics):
        if index == self.in_stage and metrics["step"] == self.at_step:
            raise self.error


@pytest.mark.parametrize("error,status", [
    (RuntimeError("disk on fire"), "FAILED"),
    pytest.param(KeyboardInterrupt(), "KILLED", marks=pytest.mark.slow),  # the same path; make test-fast runs one
])
def test_a_crash_marks_runs_and_keeps_what_was_logged(fresh_policy, tmp_path, one_thread, error, status):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracking(uri, "crash-test")
    with pytest.raises(type(error)):
        run(fresh_policy, tmp_path, "w", [tracker, Crash(error, at_step=2)])
    client = MlflowClient(uri)
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == status
    assert parent.data.tags["cotune.outcome"] == ("failed" if status == "FAILED" else "killed")
    if status == "FAILED":
        assert "disk on fire" in parent.data.tags["cotune.error"]
    stages = {c.info.run_name: c for c in client.search_runs([parent.info.experiment_id],
                                                             f"tags.mlflow.parentRunId = '{tracker.run_id}'")}
    assert stages["0-baseline"].info.status == "FINISHED" and stages["1-w"].info.status == status
    assert len(client.get_metric_history(stages["1-w"].info.run_id, "reward_mean")) == 2  # logged before the crash
    assert not client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")


@pytest.mark.slow  # two optimize() runs (crash, then resume): ~20 s on 2 cores
def test_a_resumed_run_logs_its_restored_stages(fresh_policy, tmp_path, one_thread):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracking(uri, "resume-test")
    with pytest.raises(RuntimeError):
        run(fresh_policy, tmp_path, "w -> w", [first, Crash(RuntimeError("power cut"), at_step=1, in_stage=2)])
    second = MlflowTracking(uri, "resume-test")
    result = run(fresh_policy, tmp_path, "w -> w", [second], resume=True)
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert client.get_run(second.run_id).info.status == "FINISHED"
    history = client.get_metric_history(second.run_id, "val_score")
    assert [(h.step, h.value) for h in history] == [(r.total_spend["rollouts"], r.val_score) for r in result.history]
    stages = client.search_runs([client.get_run(second.run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{second.run_id}'")
    restored = {r.info.run_name: r.data.tags.get("restored") for r in stages}
    assert restored == {"0-baseline": "true", "1-w": "true", "2-w": None}


@pytest.mark.slow  # two optimize() runs (crash, then resume): ~20 s on 2 cores
def test_a_resume_continues_the_runs_of_an_arm_named_otherwise_than_its_schedule(fresh_policy, tmp_path, one_thread):
    """`arms: {rl: w}`: the arm tag is the experiment's name for the arm, not the schedule's kind (`rl-only`); a resume
    used to compare it with the kind, open a second parent run and leave the first one (issue 32)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracking(uri, "arm-names", tags={"arm": "rl"})
    with pytest.raises(RuntimeError):
        run(fresh_policy, tmp_path, "w", [first, Crash(RuntimeError("power cut"), at_step=1)])
    second = MlflowTracking(uri, "arm-names", tags={"arm": "rl"}, resume=True)
    run(fresh_policy, tmp_path, "w", [second], resume=True)
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_run(first.run_id).info.experiment_id], "tags.`cotune.kind` = 'run'")
    assert second.run_id == first.run_id and len(parents) == 1, [p.info.run_id for p in parents]
    assert client.get_run(first.run_id).info.status == "FINISHED" and client.get_run(first.run_id).data.tags["arm"] == "rl"


def test_unusable_tracking_stores_fail_fast(tmp_path):
    with pytest.raises(TrackingError, match="cannot reach"):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="file store"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


RACE = """
import sys, time
from experiments.tracking import check_tracking_uri
from mlflow import MlflowClient
from experiments.tuning import create_or_load_study, open_storage
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # every process opens the fresh files at the same moment
check_tracking_uri(sys.argv[1])
MlflowClient(sys.argv[1]).search_experiments()
create_or_load_study("s", open_storage(sys.argv[2], heartbeat_interval=None))
"""


@pytest.mark.slow  # four processes that import cotune and wait for one start time: ~40 s on 2 cores
def test_processes_racing_to_create_one_sqlite_store_all_succeed(tmp_path):
    # CI once lost a `cotune tune` worker to "table _alembic_tmp_experiments already exists": two processes migrated
    # one fresh mlflow.db at once and left it half-made. The first open now holds a lock file beside the database.
    tracking, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    start = str(time.time() + 8)  # after the imports of every process
    procs = [subprocess.Popen([sys.executable, "-c", RACE, tracking, storage, start], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n---\n".join(o[-2000:] for o in outputs)
    assert [e.name for e in MlflowClient(tracking).search_experiments()] == ["Default"]
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]


def test_an_untrained_adapter_hashes_as_no_adapter_whatever_its_seeded_lora_a(fresh_policy):
    """Seeds that all kept the untuned program differ only in lora_A (B is zero): the same program for compare."""
    from types import SimpleNamespace

    import torch

    from experiments.tracking import program_hash
    from programs.tasks import last_digit

    result = SimpleNamespace(program=last_digit.predict_program(), policy=fresh_policy)
    untrained = program_hash(result)
    state = fresh_policy.adapter_state()
    a_name = next(k for k in state if "lora_A" in k)
    b_name = a_name.replace("lora_A", "lora_B")
    params = dict(fresh_policy.model.named_parameters())

    def param(name):  # PEFT's state-dict names drop the adapter name that the module's parameters carry
        return next(p for n, p in params.items() if n.replace(".default", "") == name)

    with torch.no_grad():
        param(a_name).add_(1.0)  # another seed's lora_A
        assert program_hash(result) == untrained
        param(b_name).add_(0.01)  # trained: B is no longer zero
        assert program_hash(result) != untrained
