"""Tuning with Optuna: an experiment's ``tune.space`` searched by a study, one ``optimize()`` run per trial
(``cotune tune``).

Why one module: a trial *is* one ``optimize()`` call, so tuning needs four things, all here: (1) a search space
over the same names the experiment files use (``schedule``, ``weights.learning_rate``, ``lora.r``,
``prompt.max_bootstrapped_demos`` ...; parsed by :mod:`experiments.space`, which the file validator shares), (2) a callback that reports the val score after every stage and raises
:class:`optuna.TrialPruned` when the pruner says so (``optimize()`` then stops, keeps what it saved and re-raises),
(3) a study that several worker processes, on one machine or many, share through one storage: sqlite for a single
machine, any SQLAlchemy URL (PostgreSQL, MySQL) across machines, or ``journal:PATH`` for Optuna's journal file, and
(4) :func:`tune_experiment`, the worker: it joins the study named in the file (creating it if it is the first),
runs its share of trials and prints the best configuration so far. Start as many workers as you like with the same
``--storage`` and the same tracking server: trial numbers are assigned by the storage, so no trial is lost or run
twice.

Facts this module relies on (optuna 5.0): trial numbers are assigned under a row lock on the study, so
concurrent workers never share a number; two processes creating the *tables* of a fresh sqlite file at once
can collide (``table version_info already exists``), so opening a sqlite storage holds a lock file;
``create_study`` with ``load_if_exists=False`` raises ``DuplicatedStudyError`` for all but one of several racing
creators, which tells exactly one worker that it created the study.

MLflow layout: one *study run* per study (tag ``cotune.kind=study``; created by the worker that created the
study, its id kept in the study's user attributes so every worker nests under it), and one nested run per
trial (tag ``cotune.kind=trial``, ``optuna.trial=<number>``) with the usual nested stage runs below it. The
study run holds the best value so far, the best parameters (tags ``best.<param>``) and ``best_config.yaml``.

Example:
    >>> space = parse_space({"schedule": {"choices": ["p -> w", "w -> p"]},
    ...                      "weights.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}})
    >>> study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    >>> params = suggest(study.ask(), space)
    >>> sorted(params), params["schedule"] in ("p -> w", "w -> p")
    (['schedule', 'weights.learning_rate'], True)
    >>> apply_params({"weights": {"beta": 0.0}}, {"weights.learning_rate": 0.001})
    {'weights': {'beta': 0.0, 'learning_rate': 0.001}}
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import yaml
from filelock import FileLock

from experiments.config import ConfigError, Experiment, arm_folder
from experiments.runner import run_one
from experiments.space import Param, TuneError, parse_param, parse_space
from experiments.tracking import (
    KIND_TAG,
    MlflowTracking,
    check_tracking_uri,
    flatten,
    get_or_create_experiment,
    redact,
    resolve_tracking_uri,
    sqlite_file,
)
from optimizers.callbacks import OptimizeCallback
from rl.atomic import plain_tree

__all__ = ["Param", "PruneOnStage", "TuneError", "TuneOutcome", "apply_params", "best_summary",
           "create_or_load_study", "default_storage", "make_pruner", "make_sampler", "open_storage", "parse_param",
           "parse_space", "run_trials", "suggest", "tune_experiment"]


# --- search spaces (parsed by experiments/space.py, which the experiment-file validator shares) -----------------


def suggest(trial: optuna.Trial, space: Mapping[str, Param]) -> dict[str, Any]:
    """One value per parameter for ``trial``: ``{"schedule": "p -> w", "weights.learning_rate": 0.003, ...}``."""
    return {name: param.suggest(trial) for name, param in space.items()}


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (nested dicts) with dotted ``params`` written into it; ``base`` is not modified."""
    out = copy.deepcopy(dict(base))
    for name, value in params.items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TuneError(f"cannot set {name!r}: {part!r} is not a section")
        node[leaf] = value
    return out


# --- pruning ------------------------------------------------------------------------------------


class PruneOnStage(OptimizeCallback):
    """Report the val score after every stage (step = stage index) and prune when the pruner says so.

    The untuned baseline (stage 0) is not reported: it is the same for every trial of a study. Put this
    callback *after* a tracking callback, so that the stage that triggers pruning is still logged.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.reported: list[tuple[int, float]] = []

    def on_stage_end(self, run, record) -> None:
        if record.index == 0:
            return
        self.trial.report(float(record.val_score), step=record.index)
        self.reported.append((record.index, float(record.val_score)))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned after stage {record.name} "
                                     f"(val {record.val_score:.3f})")


# --- samplers, pruners, storage ------------------------------------------------------------------


def make_sampler(spec: Mapping[str, Any] | None, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """``{type: tpe|random, seed: S, n_startup_trials: N}``; worker ``k`` of a study passes ``seed_offset=k``
    so that seeded workers do not propose identical configurations."""
    spec = dict(spec or {"type": "tpe"})
    kind = spec.pop("type", "tpe")
    seed = spec.pop("seed", None)
    seed = None if seed is None else int(seed) + seed_offset
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        kwargs = {"n_startup_trials": int(spec["n_startup_trials"])} if "n_startup_trials" in spec else {}
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    raise TuneError(f"unknown sampler {kind!r}; use 'tpe' or 'random'")


def make_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """``{type: median|percentile|none, n_startup_trials: N, n_warmup_steps: W, percentile: P}``."""
    spec = dict(spec or {"type": "median"})
    kind = spec.pop("type", "median")
    common = {"n_startup_trials": int(spec.get("n_startup_trials", 2)),
              "n_warmup_steps": int(spec.get("n_warmup_steps", 0))}
    if kind == "median":
        return optuna.pruners.MedianPruner(**common)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(float(spec.get("percentile", 25.0)), **common)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"unknown pruner {kind!r}; use 'median', 'percentile' or 'none'")


def open_storage(url: str, *, heartbeat_interval: int | None = 60, attempts: int = 5) -> optuna.storages.BaseStorage:
    """An Optuna storage several worker processes can share.

    ``sqlite:///path``, ``postgresql+psycopg://user@host/db`` (any SQLAlchemy URL) or ``journal:PATH``.
    RDB storages get a heartbeat: a trial whose worker died is marked FAIL by the next worker instead of
    staying RUNNING forever. Opening retries, because racing processes can collide creating fresh tables.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):]
        if not path:
            raise TuneError("journal storage needs a path: journal:/path/to/optuna.journal")
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise TuneError(f"storage {url!r} is not a URL; use sqlite:///optuna.db, postgresql+psycopg://... "
                        "or journal:PATH")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}  # wait for the other worker's write lock
    else:
        engine_kwargs["pool_pre_ping"] = True
    heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 4 * heartbeat_interval} \
        if heartbeat_interval else {}
    # Creating the tables of a fresh sqlite file is serialised by a lock file beside it (racing creators can leave a
    # half-made schema); other databases get retries, since their workers may sit on different machines.
    sqlite = sqlite_file(url)
    lock = FileLock(f"{sqlite}.lock") if sqlite is not None else contextlib.nullcontext()
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with lock, warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5.0 and work as documented
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except ImportError as exc:
            raise TuneError(f"storage {redact(url)}: a database driver is missing ({exc}); for PostgreSQL "
                            "install psycopg[binary] (pip install 'cotune[postgres]')") from exc
        except Exception as exc:  # noqa: BLE001 - table-creation races; the last error is raised below
            last = exc
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise TuneError(f"cannot open Optuna storage {redact(url)}: {type(last).__name__}: "
                    f"{str(last).splitlines()[0] if last else ''}")


def create_or_load_study(name: str, storage: optuna.storages.BaseStorage | str, *, direction: str = "maximize",
                         sampler: optuna.samplers.BaseSampler | None = None,
                         pruner: optuna.pruners.BasePruner | None = None) -> tuple[optuna.Study, bool]:
    """The study ``name`` in ``storage``, and whether this call created it (exactly one racing worker does)."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=False)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if len(study.directions) != 1 or study.direction.name.lower() != direction:
        raise TuneError(f"study {name!r} already exists with direction {study.direction.name.lower()}, "
                        f"not {direction}; use another study name")
    return study, False


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int, *,
               catch: Iterable[type[Exception]] = (ValueError,),
               callbacks: Iterable[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = ()) -> None:
    """Run ``n_trials`` trials *in this worker* (other workers on the same study add theirs).

    Config errors (``ValueError``: a bad combination the sampler proposed) fail that trial and the study goes
    on; anything else stops this worker after marking its trial FAIL.
    """
    if n_trials < 1:
        raise TuneError(f"the number of trials must be >= 1, got {n_trials}")
    study.optimize(objective, n_trials=n_trials, catch=tuple(catch), callbacks=list(callbacks),
                   gc_after_trial=True, show_progress_bar=False)


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """``{"number", "value", "params"}`` of the best finished trial, or ``None`` when no trial completed."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done:
        return None
    best = study.best_trial
    return {"number": best.number, "value": best.value, "params": dict(best.params)}


# --- the worker: one experiment's study ----------------------------------------------------------


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


def _study_run(client, experiment_id: str, study: optuna.Study, created: bool, exp: Experiment, storage: str,
               store: optuna.storages.BaseStorage) -> str:
    """The study's MLflow run: created by the worker that created the study, found by the others.

    ``storage`` is the storage URL (recorded, redacted, on the study run); ``store`` the storage object the study
    was opened on, which the other workers re-read the study from until its creator has recorded the run id.
    """
    if created:
        run = client.create_run(experiment_id, run_name=f"study-{study.study_name}", tags={
            KIND_TAG: "study", "optuna.study": study.study_name, "optuna.storage": redact(storage),
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
        run_id = optuna.load_study(study_name=study.study_name, storage=store).user_attrs.get(STUDY_RUN_ATTR)
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
        TuneError: a storage that cannot be opened.
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

    store, study, created = _open_study(spec, name, storage_url, worker_index)
    study_run_id = _study_run(client, experiment_id, study, created, exp, storage_url, store)
    print(f"[cotune] study {name!r} in {redact(storage_url)} ({'created' if created else 'joined'}), worker "
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
        root = exp.runs_dir / "tune" / arm_folder(name) / f"trial-{trial.number}"
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
    best_config = None if best is None else _save_best_config(exp, best, name, client, study_run_id, out)
    return TuneOutcome(study=name, storage=storage_url, trials_run=n_trials, best=best, best_config=best_config,
                       study_run_id=study_run_id, states=_state_counts(study))


def _open_study(spec, name: str, storage_url: str, worker_index: int):
    """Open the storage and join (or create) the study; a study this worker creates gets the enqueued configs.

    Returns:
        ``(store, study, created)``.
    """
    store = open_storage(storage_url)
    sampler_spec = {**spec.sampler, "seed": spec.sampler.get("seed", spec.seed)}
    study, created = create_or_load_study(name, store, direction=spec.direction,
                                          sampler=make_sampler(sampler_spec, seed_offset=worker_index),
                                          pruner=make_pruner(spec.pruner))
    if created:
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    return store, study, created


def _save_best_config(exp: Experiment, best: dict[str, Any], name: str, client, study_run_id: str,
                      out: IO[str]) -> dict[str, Any]:
    """Write ``best_config.yaml``: the experiment with the best trial's values applied, and ``tune_best`` naming
    the trial, so that the file alone says what the winner ran with; also log it to the study run."""
    best_config = exp.with_overrides(best["params"]).to_dict()
    best_config["tune_best"] = {"trial": best["number"], "value": best["value"], "params": best["params"]}
    path = exp.runs_dir / "tune" / arm_folder(name) / "best_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plain_tree(best_config), sort_keys=False))  # YAML keeps NaN: no jsonable
    try:
        client.log_artifact(study_run_id, str(path))
    except Exception as exc:  # noqa: BLE001 - the result is printed and saved locally anyway
        print(f"[cotune] warning: could not log best_config.yaml to MLflow ({exc})", file=out)
    return best_config


def _state_counts(study: optuna.Study) -> dict[str, int]:
    """How many of the study's trials (every worker's) are in each state, e.g. ``{"COMPLETE": 7, "PRUNED": 3}``."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


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
    except Exception as exc:  # noqa: BLE001 - the trials are done and stored; only the study run's status is missed
        print(f"[cotune] warning: could not end the MLflow study run {run_id} ({type(exc).__name__}: {exc}); it "
              "stays RUNNING until another worker of the study ends it", file=sys.stderr)

