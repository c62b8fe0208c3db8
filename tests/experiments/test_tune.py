"""Optuna tuning: search spaces, the pruning callback, shared storages, and a real pruned trial on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

from experiments.tracking import redact
from experiments.tuning import (
    PruneOnStage,
    TuneError,
    apply_params,
    create_or_load_study,
    make_pruner,
    make_sampler,
    open_storage,
    parse_param,
    parse_space,
    suggest,
)


def test_parse_param_kinds_and_errors():
    assert parse_param("lora.r", {"choices": [8, 16]}).kind == "categorical"
    assert parse_param("lora.r", {"low": 4, "high": 32}).kind == "int"
    assert parse_param("weights.beta", {"low": 0, "high": 1}, kind_hint="float").kind == "float"
    p = parse_param("weights.learning_rate", {"low": "1e-4", "high": "1e-2", "log": True})
    assert (p.kind, p.low, p.high, p.log) == ("float", 1e-4, 1e-2, True)
    for bad, match in [({"low": 2, "high": 1}, "above high"), ({"low": 0, "high": 1, "log": True}, "low > 0"),
                       ({"choices": []}, "non-empty"), ({"choices": [1], "low": 0}, "not both"),
                       ({"lo": 1}, "unknown key"), ({"low": 1}, "both low and high"),
                       ({"low": 1.5, "high": 3, "type": "int"}, "integer bounds")]:
        with pytest.raises(TuneError, match=match):
            parse_param("x", bad)


def test_suggest_and_apply_params():
    space = parse_space({"schedule": {"choices": ["p -> w", "w"]}, "weights.learning_rate": {"low": 1e-4, "high": 1e-2,
                                                                                            "log": True},
                         "lora.r": {"low": 4, "high": 16, "step": 4}})
    params = suggest(optuna.trial.FixedTrial({"schedule": "w", "weights.learning_rate": 1e-3, "lora.r": 8}), space)
    assert params == {"schedule": "w", "weights.learning_rate": 1e-3, "lora.r": 8}
    nested = apply_params({"weights": {"beta": 0.0}}, {k: v for k, v in params.items() if "." in k})
    assert nested == {"weights": {"beta": 0.0, "learning_rate": 1e-3}, "lora": {"r": 8}}


def test_prune_on_stage_reports_each_stage_and_prunes_a_poor_one():
    study = optuna.create_study(direction="maximize", pruner=make_pruner({"type": "median", "n_startup_trials": 1}))
    record = lambda index, val: SimpleNamespace(index=index, val_score=val, name=f"{index}-w")  # noqa: E731

    good = study.ask()
    callback = PruneOnStage(good)
    callback.on_stage_end(None, record(0, 0.3))  # the baseline is not reported
    callback.on_stage_end(None, record(1, 0.8))
    study.tell(good, 0.9)
    assert callback.reported == [(1, 0.8)]

    poor = PruneOnStage(study.ask())
    with pytest.raises(optuna.TrialPruned, match="stage 1-w"):
        poor.on_stage_end(None, record(1, 0.1))


def test_study_creation_says_who_created_it(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study, created = create_or_load_study("s", storage, direction="maximize")
    assert created
    again, created = create_or_load_study("s", open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert not created and again.study_name == "s"
    with pytest.raises(TuneError, match="direction"):
        create_or_load_study("s", storage, direction="minimize")
    assert isinstance(open_storage(f"journal:{tmp_path / 'j.log'}"), optuna.storages.BaseStorage)
    with pytest.raises(TuneError):
        open_storage("optuna.db")


def test_a_joining_worker_finds_the_study_run_through_the_storage_it_opened(tmp_path, monkeypatch):
    from experiments import tuning

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    creator, created = create_or_load_study("s", open_storage(url))
    store = open_storage(url)
    joined, created_here = create_or_load_study("s", store)
    assert created and not created_here
    slept = []

    def record_the_run_id_later(seconds):  # the creator records its MLflow run while the joiner waits
        slept.append(seconds)
        creator.set_user_attr(tuning.STUDY_RUN_ATTR, "run-1")

    monkeypatch.setattr(tuning.time, "sleep", record_the_run_id_later)
    assert tuning._study_run(None, "0", joined, False, SimpleNamespace(), url, store) == "run-1"
    assert slept == [1.0]


def test_workers_samplers_differ_and_urls_are_redacted():
    draws = []
    for k in (0, 1):
        study = optuna.create_study(sampler=make_sampler({"type": "random", "seed": 3}, seed_offset=k))
        draws.append(study.ask().suggest_float("x", 0, 1))
    assert draws[0] != draws[1]
    assert redact("postgresql+psycopg://bob:s3cret@db:5432/optuna") == "postgresql+psycopg://bob:***@db:5432/optuna"


@pytest.mark.slow
def test_a_trial_with_a_poor_first_stage_is_pruned(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """Two enqueued trials: a sane learning rate, then one so large that stage 1 destroys the model."""
    import torch
    from mlflow import MlflowClient

    from experiments.config import load_experiment
    from experiments.tuning import tune_experiment
    from tests.experiments.helpers import write_experiment

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    path = write_experiment(tmp_path / "prune.yaml", name="prune", extra="""
        tune:
          sampler: {type: random, seed: 0}
          pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
          space:
            weights.learning_rate: {choices: [5.0e-4, 0.5]}
          enqueue:
            - {weights.learning_rate: 5.0e-4}
            - {weights.learning_rate: 0.5}
        """, **{'  prompt-only: "p"\n  rl-only: "w"\n  joint: "p -> w"': '  rl-only: "w -> w"', "budget: 192": "budget: 128",
                "test: 16": "test: 0"})
    exp = load_experiment(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = tune_experiment(exp, 2, storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=uri)

    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.PRUNED}
    assert study.trials[1].intermediate_values[1] < study.trials[0].intermediate_values[1]
    assert outcome.best["number"] == 0 and outcome.best_config["weights"]["learning_rate"] == 5.0e-4

    client = MlflowClient(uri)
    pruned = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert pruned.info.status == "KILLED" and pruned.data.tags["cotune.outcome"] == "pruned"
    assert pruned.data.tags["mlflow.parentRunId"] == outcome.study_run_id
    stages = client.search_runs([pruned.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{pruned.info.run_id}'")
    assert sorted(r.info.run_name for r in stages) == ["0-baseline", "1-w"]  # stage 2 never ran
    study_run = client.get_run(outcome.study_run_id)
    assert study_run.data.tags["best.weights.learning_rate"] == "0.0005" and "best_value" in study_run.data.metrics
    assert [a.path for a in client.list_artifacts(outcome.study_run_id) if a.path.endswith("best_config.yaml")]
    assert "trial 1: pruned" in capsys.readouterr().out
