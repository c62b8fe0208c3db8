"""``cotune tune``: an Optuna study over an experiment's ``tune.space``, one ``optimize()`` run per trial.

Why here: ``optimizers.tune`` knows Optuna (spaces, pruning, shared storage); this module knows experiments
(tasks, models, MLflow). A worker process joins the study named in the file (creating it if it is the first),
runs its share of trials and prints the best configuration so far. Start as many workers as you like, on one
machine or several, with the same ``--storage`` (PostgreSQL or any SQLAlchemy URL across machines) and the same
tracking server: trial numbers are assigned by the storage, so no trial is lost or run twice.

MLflow layout: one *study run* per study (tag ``cotune.kind=study``; created by the worker that created the
study, its id kept in the study's user attributes so every worker nests under it), and one nested run per
trial (tag ``cotune.kind=trial``, ``optuna.trial=<number>``) with the usual nested stage runs below it. The
study run holds the best value so far, the best parameters (tags ``best.<param>``) and ``best_config.yaml``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import yaml

from experiments.config import ConfigError, Experiment
from experiments.runner import _slug, run_one
from experiments.tracking import (
    KIND_TAG,
    MlflowTracking,
    check_tracking_uri,
    flatten,
    get_or_create_experiment,
    resolve_tracking_uri,
)
from optimizers.tune import (
    PruneOnStage,
    best_summary,
    create_or_load_study,
    make_pruner,
    make_sampler,
    open_storage,
    parse_space,
    redact_url,
    run_trials,
    suggest,
)

STUDY_RUN_ATTR = "mlflow_run_id"
WAIT_FOR_STUDY_RUN_S = 120


@dataclass
class TuneOutcome:
    study: str
    storage: str
    trials_run: int
    best: dict[str, Any] | None
    best_config: dict[str, Any] | None
    study_run_id: str | None
    states: dict[str, int]


def default_storage(directory: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{(Path(directory or Path.cwd()) / 'optuna.db').resolve()}"


def _study_run(client, experiment_id: str, study: optuna.Study, created: bool, exp: Experiment, storage: str) -> str:
    """The study's MLflow run: created by the worker that created the study, found by the others."""
    if created:
        run = client.create_run(experiment_id, run_name=f"study-{study.study_name}", tags={
            KIND_TAG: "study", "optuna.study": study.study_name, "optuna.storage": redact_url(storage),
            "task": exp.task_name, "experiment": exp.name})
        run_id = run.info.run_id
        params = {f"space.{k}": v for k, v in flatten(exp.tune.space).items()} if exp.tune else {}
        from mlflow.entities import Param

        rows = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(rows), 100):
            client.log_batch(run_id, params=rows[i:i + 100])
        if exp.source and Path(exp.source).is_file():
            client.log_artifact(run_id, exp.source)
        study.set_user_attr(STUDY_RUN_ATTR, run_id)
        return run_id
    deadline = time.time() + WAIT_FOR_STUDY_RUN_S
    while time.time() < deadline:
        run_id = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get(STUDY_RUN_ATTR)
        if run_id:
            return run_id
        time.sleep(1.0)
    raise ConfigError(f"study {study.study_name!r} has no MLflow study run after {WAIT_FOR_STUDY_RUN_S}s (the worker "
                      "that created it may have crashed); start a new study with --study NAME")


def tune_experiment(exp: Experiment, n_trials: int, *, storage: str | None = None, study_name: str | None = None,
                    tracking_uri: str | None = None, worker_index: int = 0, verbose: bool = False,
                    out: IO[str] | None = None) -> TuneOutcome:
    """Run ``n_trials`` trials of the experiment's study in this process (a worker).

    Args:
        exp: an experiment with a ``tune:`` section.
        n_trials: trials this worker runs (other workers add theirs to the same study).
        storage: Optuna storage URL (default: ``tune.storage``, else ``sqlite:///./optuna.db``).
        study_name: default ``tune.study`` (the experiment's name).
        tracking_uri: MLflow tracking URI (as for ``cotune run``).
        worker_index: distinct per worker of one study, so that seeded samplers do not propose the same configs.
        verbose: show the stages' own progress.
        out: where progress goes.

    Raises:
        ConfigError: no ``tune:`` section.
        optimizers.tune.TuneError: a storage that cannot be opened.
        experiments.tracking.TrackingError: an unreachable tracking store.
    """
    out = out or sys.stdout
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    if exp.tune is None:
        raise ConfigError("has no tune: section (storage, space); see experiments/quickstart.yaml",
                          source=exp.source, key="tune")
    spec = exp.tune
    storage_url = storage or spec.storage or default_storage()
    name = study_name or spec.study
    space = parse_space(spec.space)
    uri = resolve_tracking_uri(tracking_uri, exp.tracking_uri)
    check_tracking_uri(uri)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, exp.mlflow_experiment, uri)

    store = open_storage(storage_url)
    sampler_spec = {**spec.sampler, "seed": spec.sampler.get("seed", spec.seed)}
    study, created = create_or_load_study(name, store, direction=spec.direction,
                                          sampler=make_sampler(sampler_spec, seed_offset=worker_index),
                                          pruner=make_pruner(spec.pruner))
    if created:
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    study_run_id = _study_run(client, experiment_id, study, created, exp, storage_url)
    print(f"[cotune] study {name!r} in {redact_url(storage_url)} ({'created' if created else 'joined'}), worker "
          f"{worker_index}: {n_trials} trial(s); MLflow study run {study_run_id} in {uri}", file=out, flush=True)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        trial_exp = exp.with_overrides(params)
        arm = trial_exp.arms[0]
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"[cotune] trial {trial.number} (worker {worker_index}): {shown}", file=out, flush=True)
        tracker = MlflowTracking(uri, exp.mlflow_experiment, parent_run_id=study_run_id,
                                 log_artifacts=exp.log_artifacts, run_name=f"trial-{trial.number}",
                                 extra_params={f"trial.{k}": v for k, v in params.items()},
                                 tags={KIND_TAG: "trial", "optuna.study": name, "optuna.trial": trial.number,
                                       "experiment": exp.name})
        root = exp.runs_dir / "tune" / _slug(name) / f"trial-{trial.number}"
        try:
            outcome = run_one(trial_exp, arm, spec.seed, tracker=tracker, callbacks=[PruneOnStage(trial)],
                              output_dir=root, verbose=verbose, out=out)
        finally:
            if tracker.run_id:
                trial.set_user_attr(STUDY_RUN_ATTR, tracker.run_id)
        return outcome.val_score

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"val {trial.value:.3f}" if trial.value is not None else ""
        print(f"[cotune] trial {trial.number}: {trial.state.name.lower()} {value}".rstrip(), file=out, flush=True)
        run_id = trial.user_attrs.get(STUDY_RUN_ATTR)
        if run_id:
            tags = {"optuna.state": trial.state.name}
            metrics = {"objective": trial.value} if trial.value is not None else {}
            _log(client, run_id, metrics, tags, step=trial.number)
        best = best_summary(study)
        if best is not None:
            _log(client, study_run_id, {"best_value": best["value"]},
                 {"best.trial": best["number"], **{f"best.{k}": v for k, v in best["params"].items()}},
                 step=len(study.get_trials(deepcopy=False)))

    interrupted = False
    try:
        run_trials(study, objective, n_trials, callbacks=[after_trial])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _finish_study_run(client, study, study_run_id, interrupted)

    best = best_summary(study)
    best_config = None
    if best is not None:
        best_config = exp.with_overrides(best["params"]).to_dict()
        best_config["tune_best"] = {"trial": best["number"], "value": best["value"], "params": best["params"]}
        path = exp.runs_dir / "tune" / _slug(name) / "best_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(_plain(best_config), sort_keys=False))
        try:
            client.log_artifact(study_run_id, str(path))
        except Exception as exc:  # noqa: BLE001 - the result is printed and saved locally anyway
            print(f"[cotune] warning: could not log best_config.yaml to MLflow ({exc})", file=out)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return TuneOutcome(study=name, storage=storage_url, trials_run=n_trials, best=best, best_config=best_config,
                       study_run_id=study_run_id, states=states)


def _log(client, run_id: str, metrics: dict[str, Any], tags: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as exc:  # noqa: BLE001 - logging never stops a study
        print(f"[cotune] warning: MLflow logging failed ({type(exc).__name__}: {exc})", file=sys.stderr)


def _finish_study_run(client, study: optuna.Study, run_id: str, interrupted: bool) -> None:
    """End the study run when no trial of any worker is still running (the last worker to finish ends it)."""
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        return
    try:
        client.set_terminated(run_id, "KILLED" if interrupted else "FINISHED")
    except Exception:  # noqa: BLE001
        pass


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
