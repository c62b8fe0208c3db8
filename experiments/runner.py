"""Run an experiment file: every arm x seed is one ``optimize()`` call on a fresh policy, tracked in MLflow.

Why a runner apart from the CLI: ``cotune run`` and ``cotune tune`` (one trial = one run) build runs the same
way -- task data, program, metric, a fresh policy with the configured LoRA shape, tracking, a held-out test
score of the returned program -- and tests drive it from Python.

Every run gets the same task data (``data.seed``) so seeds measure the optimizers' randomness, the same budget,
and its own folder ``<output_dir>/<arm>/seed-<k>``. DSPy's and the stages' chatter is appended to
``<output_dir>/<arm>/seed-<k>.log`` unless ``verbose``; the console shows one line per stage.

A run folder is hours of CPU, so nothing here deletes one. Before the first run starts, every folder of the plan
is checked (:func:`plan_runs`): one that holds a run is refused unless ``--resume`` (skip it when completed,
continue it when interrupted, both only when the settings recorded in its ``experiment.json`` are unchanged) or
``--overwrite`` (``optimize()`` moves it aside to ``<folder>.old-<date>-<time>``); one that another process is
running, one of other files, or an unwritable ``output_dir`` is refused too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from experiments.config import Arm, ConfigError, Experiment, build_metric
from experiments.tasks import resolve_task
from experiments.tracking import KIND_TAG, MlflowTracking, check_tracking_uri, flatten, redact, resolve_tracking_uri
from metrics.references import ReferenceImportError
from optimizers.callbacks import OptimizeCallback
from optimizers.errors import OutputDirError
from optimizers.run_folder import RUN_FILE, RunLock, decide, params_hash, read_folder
from optimizers.stages import KINDS
from rl import distributed
from rl.atomic import jsonable, write_json

logger = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What one run achieved (the full record is in MLflow and in ``output_dir``)."""

    arm: str
    schedule: str
    seed: int
    val_score: float
    last_val_score: float
    test_score: float | None
    rollouts: int
    lm_calls: int
    seconds: float
    run_id: str | None
    output_dir: Path
    stages: list[tuple[str, float]]


# --- building blocks of a run ---------------------------------------------------------------------


def resolve_metric(exp: Experiment, task: Any) -> Any:
    """The metric the experiment optimizes: the task's rubric, its gold metric, or an imported one.

    An imported metric (``metric: package.module:name``) is code the experiment file chooses to run; see
    :func:`metrics.references.import_reference` for what may be imported (installed packages, not the current
    directory, not the standard library).
    """
    if exp.metric == "rubric":
        return task.rubric()
    if exp.metric == "gold":
        if task.gold_metric is None:
            raise ConfigError(f"metric: task {task.name!r} has no gold metric; use 'rubric'", source=exp.source)
        return task.gold_metric
    if exp.metric.endswith(".json"):  # a rubric `cotune calibrate` wrote: its base rubric, reweighted
        from experiments.calibration import base_metric_of
        from metrics.calibration import load_calibrated

        base = base_metric_of(exp.metric)
        if base.endswith(".json"):
            raise ConfigError(f"metric: {exp.metric} names another calibrated file as its base ({base})",
                              source=exp.source)
        return load_calibrated(exp.metric, resolve_metric(dataclasses.replace(exp, metric=base), task))
    try:
        return build_metric(exp.metric)
    except ReferenceImportError as exc:
        raise ConfigError(str(exc), source=exp.source, key="metric") from None


def model_path(exp: Experiment) -> tuple[Path, str]:
    """The base model folder and its short name: an embedded model's shipped weights (checked against their
    recorded hashes), or a local model folder."""
    import embedded

    if exp.model in embedded.MODELS:
        name, path = embedded.MODELS[exp.model]
        return path(), name
    return Path(exp.model).expanduser(), Path(exp.model).name


def build_policy(exp: Experiment, seed: int):
    """A fresh policy (new LoRA adapter of the configured shape) for one run."""
    from rl.policy import LoraSettings, Policy

    path, name = model_path(exp)
    lora = LoraSettings(**{"seed": seed, **exp.lora})
    return Policy.from_pretrained(path, name=name, lora=lora, seed=seed, engine=exp.engine, vllm=exp.vllm)


class ProgressPrinter(OptimizeCallback):
    """One console line per stage (and every few weight-stage steps)."""

    def __init__(self, out: IO[str], prefix: str = "  ", every: int = 10) -> None:
        self.out, self.prefix, self.every = out, prefix, every
        self._t0 = time.perf_counter()

    def _print(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=self.out, flush=True)

    def on_run_start(self, run) -> None:
        for line in (run.params or {}).get("plan", []):  # what each stage's share of the budget buys
            self._print(f"plan: {line}")

    def on_stage_start(self, run, index, stage) -> None:
        if index > 0:
            kind = KINDS.get(stage)
            self._print(f"stage {index}-{stage} ({kind.title if kind else stage}) ...")

    def on_step(self, run, index, metrics) -> None:
        step = int(metrics.get("step", 0))
        if not step or step % self.every:
            return
        if "rollouts" in metrics:  # a weight stage samples at every step
            self._print(f"  step {step}: reward {metrics.get('reward_mean', float('nan')):.3f}, "
                        f"{metrics['rollouts']} rollouts in this stage")
        else:  # a self-training stage sampled once, then fine-tunes on the runs it kept
            self._print(f"  step {step}: loss {metrics.get('loss', float('nan')):.3f} (epoch {metrics.get('epoch', '?')}, "
                        f"trained on the {metrics.get('kept_rate', float('nan')):.0%} of runs that succeeded)")

    def on_stage_end(self, run, record) -> None:
        spent = record.total_spend
        note = f" [{record.note}]" if record.note else ""
        self._print(f"stage {record.name}: val {record.val_score:.3f} | spent {spent.get('rollouts', 0)} rollouts, "
                    f"{spent.get('lm_calls', 0)} LM calls | {record.seconds:.1f}s{note}")




class TestEvaluation(OptimizeCallback):
    """The returned program's score on the held-out test split, logged before the tracked run ends.

    Why: the val split picks candidates (prompt stages) and the best stage, so val scores are optimistic;
    the test split is seen by nothing during optimization.
    """

    def __init__(self, testset: list, metric: Any, max_tokens: int, threads: int, gold_metric: Any = None) -> None:
        self.testset, self.metric, self.max_tokens, self.threads = testset, metric, max_tokens, threads
        self.gold_metric = gold_metric
        self.tracker: MlflowTracking | None = None
        self.score: float | None = None

    def on_run_end(self, run, result) -> None:
        if not self.testset:
            return
        from metrics import as_rubric
        from optimizers.evaluate import evaluate

        lm = result.policy.lm(temperature=0.0, max_tokens=self.max_tokens, cache=False)
        ev = evaluate(result.program, self.testset, as_rubric(self.metric), lm, gold_metric=self.gold_metric,
                      num_threads=self.threads)
        self.score = ev.score
        metrics = {"test_score": ev.score, **{f"test/{k}": v for k, v in ev.components.items()}}
        if ev.gold is not None:
            metrics["test_gold_score"] = ev.gold
        if self.tracker is not None:
            self.tracker.log_metrics(metrics)


@contextlib.contextmanager
def captured_output(path: Path | None) -> Iterator[None]:
    """Send stdout/stderr chatter (DSPy prints, progress bars, warnings) to ``path``; ``None``: leave it."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    dspy_logger = logging.getLogger("dspy")
    level = dspy_logger.level
    # appended to, never truncated: a resumed (or re-run) run keeps the log of its earlier attempts
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"===== cotune {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) =====", file=log, flush=True)
        handler = logging.StreamHandler(log)
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(handler)
        dspy_logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.removeHandler(handler)
            dspy_logger.setLevel(level)


def run_one(exp: Experiment, arm: Arm, seed: int, *, tracker: MlflowTracking | None = None,
            callbacks: Sequence[OptimizeCallback] = (), output_dir: str | Path | None = None, resume: bool = False,
            overwrite: bool = True, verbose: bool = False, out: IO[str] | None = None) -> RunOutcome:
    """One ``optimize()`` call: ``arm``'s schedule with ``seed`` on a fresh policy.

    Args:
        exp: the experiment (task, data, settings, budget).
        arm: which schedule.
        seed: the run's seed (optimizers, sampling, LoRA init).
        tracker: an :class:`MlflowTracking` for this run (``None``: no tracking).
        callbacks: more callbacks, run after the tracker (e.g. Optuna's :class:`experiments.tuning.PruneOnStage`).
        output_dir: the run folder (default ``<exp.runs_dir>/<arm folder>/seed-<seed>``).
        resume: continue the interrupted run in ``output_dir`` (``optimize()`` refuses one with other settings).
        overwrite: when ``output_dir`` holds an earlier run (and not ``resume``), ``optimize()`` moves it aside to
            a timestamped folder (it never deletes it); ``False``: refuse. ``cotune run`` decides per folder
            (:func:`run_experiment`).
        verbose: show every progress bar and DSPy message instead of writing them to ``<output_dir>.log``.
        out: where progress lines go (default: stdout).
    """
    from optimizers import optimize

    out = out or sys.stdout
    task = resolve_task(exp.task)
    n = exp.data
    trainset = task.load("train", n["train"], n["seed"])
    valset = task.load("val", n["val"], n["seed"])
    testset = task.load("test", n["test"], n["seed"]) if n["test"] else []
    program = task.program(exp.program)
    metric = resolve_metric(exp, task)
    gold = task.gold_metric if exp.gold and exp.metric != "gold" else None
    distributed.on_main(model_path, exp)  # rank 0 checks an embedded model's files against their hashes first
    root = Path(output_dir) if output_dir is not None else exp.runs_dir / arm.folder / f"seed-{seed}"
    max_tokens = int(exp.eval.get("max_tokens") or exp.weights.get("max_tokens", 128))
    threads = int(exp.eval.get("threads", 16))
    test = TestEvaluation(testset, metric, max_tokens, threads, gold)
    test.tracker = tracker
    all_callbacks: list[OptimizeCallback] = [RecordSettings(exp, arm, seed), ProgressPrinter(out), test]
    if tracker is not None:
        all_callbacks.append(tracker)
    all_callbacks += list(callbacks)
    start = time.perf_counter()
    rank = f".rank{distributed.rank()}" if not distributed.is_main_process() else ""
    with captured_output(None if verbose else root.with_name(f"{root.name}{rank}.log")):
        policy = build_policy(exp, seed)
        result = optimize(
            program, trainset, valset, metric=metric, policy=policy, schedule=arm.schedule, prompt={**exp.prompt, **arm.prompt},
            weights=exp.weights, self_training=exp.self_training, budget=exp.budget, seed=seed, output_dir=root,
            resume=resume, overwrite=overwrite and not resume, progress=verbose, callbacks=all_callbacks,
            gold_metric=gold, eval_threads=threads, eval_max_tokens=max_tokens,
            tags={"task": task.name, "experiment": exp.name, "arm": arm.name})
    last = result.history[-1]
    return RunOutcome(arm=arm.name, schedule=arm.schedule, seed=seed, val_score=result.val_score,
                      last_val_score=last.val_score, test_score=test.score,
                      rollouts=last.total_spend.get("rollouts", 0), lm_calls=last.total_spend.get("lm_calls", 0),
                      seconds=time.perf_counter() - start, run_id=tracker.run_id if tracker else None,
                      output_dir=root, stages=[(r.name, r.val_score) for r in result.history])


# --- what an existing run folder holds, and what `cotune run` does with it ------------------------------


SETTINGS_FILE = "experiment.json"  # in each run folder: the experiment settings it was started with


class RunFolderError(ValueError):
    """A run folder (or the experiment's output_dir) that `cotune run` must not touch as asked: it holds a run and
    neither ``--resume`` nor ``--overwrite`` was given, the run there has other settings, it is not a run folder,
    or it cannot be written. The message names the folder and the choices."""


def run_settings(exp: Experiment, arm: Arm, seed: int) -> dict[str, Any]:
    """What one run of the experiment depends on; a resume needs them unchanged (names and paths aside)."""
    return {"task": exp.task, "program": exp.program, "model": exp.model, "engine": exp.engine, "metric": exp.metric,
            "gold": exp.gold, "data": exp.data, "schedule": arm.schedule, "seed": seed, "budget": exp.budget,
            "prompt": {**exp.prompt, **arm.prompt}, "weights": exp.weights, "self_training": exp.self_training, "lora": exp.lora,
            "eval": exp.eval}


class RecordSettings(OptimizeCallback):
    """Write the experiment settings of a run into its folder (``experiment.json``) once ``optimize()`` owns it.

    Why a callback: ``optimize()`` refuses a non-empty folder without its own ``run.json``, so nothing may be
    written before it has prepared (and locked) the folder; ``on_run_start`` comes right after.
    """

    def __init__(self, exp: Experiment, arm: Arm, seed: int) -> None:
        self.settings = run_settings(exp, arm, seed)
        self.header = {"experiment": exp.name, "source": exp.source, "arm": arm.name}

    def on_run_start(self, run) -> None:
        if run.output_dir is not None:
            write_json(Path(run.output_dir) / SETTINGS_FILE,
                       {**self.header, "settings_hash": params_hash(self.settings), "settings": self.settings})


class MovedAsideNotice(OptimizeCallback):
    """Say on the console where ``optimize(overwrite=True)`` moved the earlier run (``<folder>.old-<date>-<time>``)."""

    def __init__(self, root: Path, out: IO[str]) -> None:
        self.root, self.out = root, out
        self.before = set(self._moved())

    def _moved(self) -> list[Path]:
        return sorted(self.root.parent.glob(f"{glob.escape(self.root.name)}.old-*"))

    def on_run_start(self, run) -> None:
        for path in self._moved():
            if path not in self.before:
                print(f"  moved the earlier run of {self.root} aside to {path} (nothing was deleted)", file=self.out,
                      flush=True)


def decide_folder(root: Path, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """What `cotune run` does with one run folder: ``"new"``, ``"skip"`` (completed, same settings), ``"resume"``
    (interrupted) or ``"overwrite"`` (``optimize()`` moves the old run aside, and it starts over).

    The policy is ``optimize()``'s own (:func:`optimizers.run_folder.decide`); what `cotune run` adds is its
    settings record (``experiment.json``, so that ``--resume`` can skip a completed run) and the wording of its
    refusals in terms of its flags.

    Raises:
        RunFolderError: ``root`` (or a parent) is a file; it is a non-empty folder that is no run folder; it holds a
            run and neither flag allows touching it; or ``resume`` with a run of other settings, a damaged
            ``run.json``, or a completed run whose settings were not recorded.
        optimizers.RunLockedError: another process is running the run in ``root`` (its pid and host are named).
    """
    blocking = _file_in_the_way(root)
    if blocking is not None:
        raise RunFolderError(f"{blocking} is a file, so the run folder {root} cannot be created there; move "
                             "the file or set output_dir to another folder")
    state = read_folder(root)
    if state.holds_run:
        with RunLock(root):  # refuse now, not after the runs before it, when another process runs this folder
            pass
    recorded = _recorded_settings(root) if state.run is not None else None
    same = None if recorded is None else recorded.get("settings_hash") == params_hash(settings)
    action = decide(state, resume=resume, overwrite=overwrite, same_settings=same, skip_completed=True)
    if action == "foreign":
        raise RunFolderError(f"{root} is not empty and holds no cotune run (no {RUN_FILE}; it has "
                             f"{list(state.files[:5])}); cotune never writes into or moves such a folder: move its "
                             "files or set output_dir to another folder")
    if action in ("exists", "damaged"):
        what = "skip it" if state.status == "completed" else "continue it"
        resume_choice = "" if state.damaged else f"pass --resume to {what} (same settings only), or "
        raise RunFolderError(f"{root} already holds {state.describe()}; cotune never replaces a run "
                             f"implicitly: {resume_choice}pass --overwrite to move it aside to a timestamped folder "
                             f"({root.name}.old-<date>-<time>) and start over")
    if action == "unverifiable":
        raise RunFolderError(f"{root} holds a completed run without a readable settings record "
                             f"({SETTINGS_FILE}: an older cotune, or removed), so --resume cannot tell whether it "
                             "ran with these settings; pass --overwrite to move it aside and run again")
    if action == "other-settings":
        changed = _changed((recorded or {}).get("settings") or {}, settings)
        raise RunFolderError(f"{root} holds {state.describe()} with other settings ({changed}); --resume "
                             "continues a run only with the settings it started with: restore them, or pass "
                             "--overwrite to move the old run aside and start over with the new settings")
    return action  # new, skip, resume or overwrite ("completed" needs skip_completed=False)


def _recorded_settings(root: Path) -> dict[str, Any] | None:
    """The run's ``experiment.json``; ``None`` when missing or unreadable (as if not recorded: a resume then relies
    on ``optimize()``'s own settings check)."""
    path = root / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())  # OSError aside, every failure is a ValueError (JSON, UTF-8)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = flatten(jsonable(old)), flatten(jsonable(new))
    diffs = [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "") if diffs else \
        "recorded differently"


def check_output_dir(path: Path) -> None:
    """``path`` is (or can become) a folder this process can write.

    Raises:
        RunFolderError: it, or the first existing parent, is a file; or it cannot be created or written.
    """
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise RunFolderError(f"output_dir {path}: {blocking} is a file, not a folder; set output_dir (in the "
                             "experiment file) to a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise RunFolderError(f"cannot write to output_dir {path} ({exc.strerror or exc}); fix its permissions or "
                             "set output_dir (in the experiment file) to a writable folder") from None


def _file_in_the_way(folder: Path) -> Path | None:
    """The first existing of ``folder`` and its parents when it is not a folder (so ``folder`` cannot be made)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def plan_runs(exp: Experiment, plan: Sequence[tuple[Arm, int]], *, resume: bool, overwrite: bool) -> list[str]:
    """The decision (:func:`decide_folder`) for every run of ``plan``, all checked before the first run starts.

    Raises:
        RunFolderError: the output_dir is unusable, or some folders cannot be handled as asked (every one of them
            is named, with the choices).
    """
    check_output_dir(exp.runs_dir)
    decisions, problems = [], []
    for arm, seed in plan:
        try:
            decisions.append(decide_folder(exp.runs_dir / arm.folder / f"seed-{seed}", run_settings(exp, arm, seed),
                                           resume=resume, overwrite=overwrite))
        except (RunFolderError, OutputDirError) as exc:  # RunLockedError is an OutputDirError
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise RunFolderError(problems[0] + more)
    return decisions


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds to run: distinct integers >= 0 (``--seeds -1`` would name a folder ``seed--1``).

    Raises:
        ConfigError: a negative, non-integer or repeated seed.
    """
    out = list(seeds)
    for s in out:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"a seed is an integer >= 0, got {s!r}", key="--seeds")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct, got {out}", key="--seeds")
    return out


def run_experiment(exp: Experiment, *, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                   tracking_uri: str | None = None, track: bool = True, resume: bool = False, overwrite: bool = False,
                   verbose: bool = False, out: IO[str] | None = None) -> list[RunOutcome]:
    """Every selected arm x seed, one after the other; returns the outcomes in order.

    What happens to a run folder that already holds a run is decided for every folder before the first run
    starts (:func:`decide_folder`): nothing is ever deleted. Without a flag such a folder is refused; ``resume``
    skips a completed run and continues an interrupted one, when its settings are unchanged (else refused);
    ``overwrite`` moves the old run aside to a timestamped folder and starts over.

    Args:
        exp: the validated experiment.
        arms, seeds: subsets to run (default: all of the file's).
        tracking_uri: overrides the file's ``tracking.uri`` (then ``$MLFLOW_TRACKING_URI``, then ``./mlflow.db``).
        track: log to MLflow (checked to be reachable before the first run starts).
        resume: skip runs already completed in their folder and continue interrupted ones (same settings).
        overwrite: move earlier runs aside (``<folder>.<timestamp>``-style, by ``optimize()``) and run again.
        verbose: show the stages' own progress bars and DSPy output.
        out: where progress goes (default stdout).

    Raises:
        ConfigError: an arm or seed that cannot be run; ``resume`` together with ``overwrite``.
        RunFolderError: a run folder that cannot be handled as asked (nothing has run yet).
        experiments.tracking.TrackingError: the tracking store cannot be used (nothing has run yet).
    """
    out = out or sys.stdout
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the runs in place, "
                          "overwrite moves them aside and starts over")
    if not distributed.is_main_process():  # under accelerate launch: rank 0 tracks and reports, the others train
        out, track = open(os.devnull, "w"), False  # noqa: SIM115 - lives as long as the process
    selected = [exp.arm(a) for a in arms] if arms else list(exp.arms)
    run_seeds = check_seeds(seeds) if seeds else list(exp.seeds)
    uri = resolve_tracking_uri(tracking_uri, exp.tracking_uri) if track else None
    if uri is not None:
        check_tracking_uri(uri)
    plan = [(arm, seed) for arm in selected for seed in run_seeds]
    decisions = distributed.on_main(plan_runs, exp, plan, resume=resume, overwrite=overwrite)
    batch = uuid.uuid4().hex[:12]
    print(f"[cotune] {exp.name}: {len(plan)} runs ({len(selected)} arms x {len(run_seeds)} seeds), budget "
          f"{exp.budget} rollouts each" + (f"; tracking: {redact(uri)}" if uri else "; tracking off"), file=out, flush=True)
    outcomes: list[RunOutcome] = []
    started = time.perf_counter()
    for i, ((arm, seed), decision) in enumerate(zip(plan, decisions, strict=True), 1):
        root = exp.runs_dir / arm.folder / f"seed-{seed}"
        if decision == "skip":
            print(f"[cotune] run {i}/{len(plan)}: {arm.name} seed {seed} already completed in {root} with these "
                  "settings; skipped", file=out, flush=True)
            continue
        what = {"resume": "resuming ", "overwrite": "starting over: "}.get(decision, "")
        print(f"[cotune] run {i}/{len(plan)}: {what}arm {arm.name} ({arm.schedule}), seed {seed}", file=out,
              flush=True)
        tracker = None
        if uri is not None:
            tracker = MlflowTracking(uri, exp.mlflow_experiment, log_artifacts=exp.log_artifacts,
                                     traces_per_stage=exp.traces_per_stage,
                                     tags={KIND_TAG: "run", "cotune.batch": batch, "experiment": exp.name},
                                     run_name=f"{arm.name}-seed{seed}", resume=decision == "resume")
        notices = [MovedAsideNotice(root, out)] if decision == "overwrite" else []
        outcome = run_one(exp, arm, seed, tracker=tracker, callbacks=notices, output_dir=root,
                          resume=decision == "resume", overwrite=decision == "overwrite", verbose=verbose, out=out)
        outcomes.append(outcome)
        test = f", test {outcome.test_score:.3f}" if outcome.test_score is not None else ""
        print(f"[cotune] run {i}/{len(plan)} done: val {outcome.val_score:.3f}{test} | {outcome.rollouts} rollouts | "
              f"{outcome.seconds:.0f}s (elapsed {time.perf_counter() - started:.0f}s)", file=out, flush=True)
    return outcomes
