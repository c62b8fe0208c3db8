"""Distributed tuning: two `cotune tune` worker processes share one Optuna study and one MLflow store.

Every trial must be recorded exactly once (no lost, no duplicated trial numbers), each as one MLflow trial run
nested under the study's single run. The sqlite variant is what one machine does (local files); the PostgreSQL
variant is what several machines do (the Optuna storage on PostgreSQL, and an `mlflow server` whose backend is that
PostgreSQL).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import optuna
import pytest

from tests.experiments.helpers import (
    REPO,
    mlflow_server,
    postgres_bin,
    postgres_server,
    write_experiment,
)
from tests.requires import missing

TUNE = """
    tracking: {artifacts: false}   # this test is about trials, not uploads
    tune:
      study: shared
      sampler: {type: random, seed: 0}
      pruner: {type: none}
      space:
        schedule: {choices: ["w", "w -> w"]}
        weights.learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}
    """
TRIALS_PER_WORKER = 2


def shared_experiment(tmp_path):
    return write_experiment(tmp_path / "shared.yaml", name="shared", extra=TUNE, **{
        '  prompt-only: "p"\n  rl-only: "w"\n  joint: "p -> w"': '  rl-only: "w"', "budget: 192": "budget: 64",
        "test: 16": "test: 0"})


def run_two_workers(tmp_path, storage: str, tracking_uri: str) -> None:
    path = shared_experiment(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [subprocess.Popen([sys.executable, "-m", "experiments.cli", "tune", str(path), "--trials",
                                 str(TRIALS_PER_WORKER), "--storage", storage, "--tracking-uri", tracking_uri,
                                 "--worker-index", str(k), "--threads", "1"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for k in (0, 1)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
    assert sum("(created)" in o for o in outputs) == 1 and sum("(joined)" in o for o in outputs) == 1


def check_every_trial_recorded_once(storage: str, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    n = 2 * TRIALS_PER_WORKER
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == n

    client = MlflowClient(tracking_uri)
    eid = client.get_experiment_by_name("shared").experiment_id
    study_runs = client.search_runs([eid], "tags.`cotune.kind` = 'study'")
    assert len(study_runs) == 1 and study_runs[0].info.status == "FINISHED"
    study_run = study_runs[0]
    assert study.user_attrs["mlflow_run_id"] == study_run.info.run_id and "best_value" in study_run.data.metrics
    trial_runs = client.search_runs([eid], "tags.`cotune.kind` = 'trial'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == list(range(n))  # each exactly once
    by_number = {int(r.data.tags["optuna.trial"]): r for r in trial_runs}
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert run.data.tags["optuna.state"] == "COMPLETE" and run.data.metrics["objective"] == t.value
    assert not client.search_runs([eid], "attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_two_workers_share_sqlite_stores_on_one_machine(tmp_path, tiny_model_dir):
    # fresh files: the two workers race to create the Optuna tables and to migrate the MLflow database
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_two_workers(tmp_path, storage, tracking)
    check_every_trial_recorded_once(storage, tracking)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_postgresql_backed_mlflow_server(tmp_path, tiny_model_dir):
    if postgres_bin() is None:
        missing("postgres", "PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "CI installs it with: apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        missing("postgres", "the PostgreSQL driver is missing: pip install 'cotune[postgres]'")
    with postgres_server(tmp_path / "pg", databases=("optuna", "mlflow")) as hostport:
        storage = f"postgresql+psycopg://cotune@{hostport}/optuna"
        with mlflow_server(tmp_path / "mlflow", backend_uri=f"postgresql+psycopg://cotune@{hostport}/mlflow") as url:
            run_two_workers(tmp_path, storage, url)
            check_every_trial_recorded_once(storage, url)
