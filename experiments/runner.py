"""Run an experiment file: every arm x seed is one ``optimize()`` call on a fresh policy, tracked in MLflow.

Why a runner apart from the CLI: ``cotune run`` and ``cotune tune`` (one trial = one run) build runs the same
way -- task data, program, metric, a fresh policy with the configured LoRA shape, tracking, a held-out test
score of the returned program -- and tests drive it from Python.

Every run gets the same task data (``data.seed``) so seeds measure the optimizers' randomness, the same budget,
and its own folder ``<output_dir>/<arm>/seed-<k>``. DSPy's and the stages' chatter goes to
``<output_dir>/<arm>/seed-<k>.log`` unless ``verbose``; the console shows one line per stage.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from experiments.config import Arm, ConfigError, Experiment
from experiments.tasks import resolve_task
from experiments.tracking import KIND_TAG, MlflowTracking, check_tracking_uri, redact, resolve_tracking_uri
from optimizers.callbacks import OptimizeCallback
from rl import distributed

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
    """The metric the experiment optimizes: the task's rubric, its gold metric, or an imported one."""
    if exp.metric == "rubric":
        return task.rubric()
    if exp.metric == "gold":
        if task.gold_metric is None:
            raise ConfigError(f"metric: task {task.name!r} has no gold metric; use 'rubric'", source=exp.source)
        return task.gold_metric
    import importlib

    module, _, attr = exp.metric.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    from metrics import Rubric

    if isinstance(obj, Rubric):
        return obj
    required = [p for p in inspect.signature(obj).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return obj() if not required else obj  # a zero-argument factory builds the metric


def model_path(exp: Experiment, out: IO[str] | None = None) -> tuple[Path, str]:
    """The base model folder and its short name (the embedded model is built on first use)."""
    if exp.model != "tiny":
        return Path(exp.model).expanduser(), Path(exp.model).name
    from programs.embedded import TINY_NAME, tiny_model_path

    announced = []

    def progress(step: int, total: int, loss: float) -> None:
        if not announced and out is not None:
            print(f"[cotune] building the embedded tiny model (first run only, a few minutes on 2 cores; "
                  f"{total} steps)", file=out, flush=True)
            announced.append(True)
        if out is not None and (step % max(1, total // 10) == 0 or step == total):
            print(f"[cotune]   warm-start step {step}/{total} loss {loss:.3f}", file=out, flush=True)

    return tiny_model_path(progress=progress), TINY_NAME


def build_policy(exp: Experiment, seed: int, out: IO[str] | None = None):
    """A fresh policy (new LoRA adapter of the configured shape) for one run."""
    from rl.policy import LoraSettings, Policy

    path, name = model_path(exp, out)
    lora = LoraSettings(**{"seed": seed, **exp.lora})
    return Policy.from_pretrained(path, name=name, lora=lora, seed=seed, engine=exp.engine, vllm=exp.vllm)


class ProgressPrinter(OptimizeCallback):
    """One console line per stage (and every few weight-stage steps)."""

    def __init__(self, out: IO[str], prefix: str = "  ", every: int = 10) -> None:
        self.out, self.prefix, self.every = out, prefix, every
        self._t0 = time.perf_counter()

    def _print(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=self.out, flush=True)

    def on_stage_start(self, run, index, stage) -> None:
        if index > 0:
            self._print(f"stage {index}-{stage} ({STAGE_WORDS.get(stage, stage)}) ...")

    def on_step(self, run, index, metrics) -> None:
        step = int(metrics.get("step", 0))
        if step and step % self.every == 0:
            self._print(f"  step {step}: reward {metrics.get('reward_mean', float('nan')):.3f}, "
                        f"{metrics.get('rollouts', 0)} rollouts in this stage")

    def on_stage_end(self, run, record) -> None:
        spent = record.total_spend
        note = f" [{record.note}]" if record.note else ""
        self._print(f"stage {record.name}: val {record.val_score:.3f} | spent {spent.get('rollouts', 0)} rollouts, "
                    f"{spent.get('lm_calls', 0)} LM calls | {record.seconds:.1f}s{note}")


STAGE_WORDS = {"p": "prompt optimization", "w": "GRPO on LoRA", "s": "fine-tune on own traces"}


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
    with open(path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
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
            verbose: bool = False, out: IO[str] | None = None) -> RunOutcome:
    """One ``optimize()`` call: ``arm``'s schedule with ``seed`` on a fresh policy.

    Args:
        exp: the experiment (task, data, settings, budget).
        arm: which schedule.
        seed: the run's seed (optimizers, sampling, LoRA init).
        tracker: an :class:`MlflowTracking` for this run (``None``: no tracking).
        callbacks: more callbacks, run after the tracker (e.g. Optuna's :class:`optimizers.tune.PruneOnStage`).
        output_dir: the run folder (default ``<exp.runs_dir>/<arm>/seed-<seed>``); an earlier run there is replaced
            unless ``resume``.
        resume: continue an interrupted run in ``output_dir``.
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
    distributed.on_main(model_path, exp, out)  # build the embedded model first (rank 0, progress on the console)
    root = Path(output_dir) if output_dir is not None else exp.runs_dir / _slug(arm.name) / f"seed-{seed}"
    max_tokens = int(exp.eval.get("max_tokens") or exp.weights.get("max_tokens", 128))
    threads = int(exp.eval.get("threads", 16))
    test = TestEvaluation(testset, metric, max_tokens, threads, gold)
    test.tracker = tracker
    all_callbacks: list[OptimizeCallback] = [ProgressPrinter(out), test]
    if tracker is not None:
        all_callbacks.append(tracker)
    all_callbacks += list(callbacks)
    start = time.perf_counter()
    rank = f".rank{distributed.rank()}" if not distributed.is_main_process() else ""
    with captured_output(None if verbose else root.with_name(f"{root.name}{rank}.log")):
        policy = build_policy(exp, seed)
        result = optimize(
            program, trainset, valset, metric=metric, policy=policy, schedule=arm.schedule, prompt=exp.prompt,
            weights=exp.weights, self_training=exp.self_training, budget=exp.budget, seed=seed, output_dir=root,
            resume=resume, overwrite=not resume, progress=verbose, callbacks=all_callbacks, gold_metric=gold,
            eval_threads=threads, eval_max_tokens=max_tokens,
            tags={"task": task.name, "experiment": exp.name, "arm": arm.name})
    last = result.history[-1]
    return RunOutcome(arm=arm.name, schedule=arm.schedule, seed=seed, val_score=result.val_score,
                      last_val_score=last.val_score, test_score=test.score,
                      rollouts=last.total_spend.get("rollouts", 0), lm_calls=last.total_spend.get("lm_calls", 0),
                      seconds=time.perf_counter() - start, run_id=tracker.run_id if tracker else None,
                      output_dir=root, stages=[(r.name, r.val_score) for r in result.history])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(" -> ", "-"))


def _completed(root: Path) -> bool:
    import json

    try:
        return json.loads((root / "run.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def run_experiment(exp: Experiment, *, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                   tracking_uri: str | None = None, track: bool = True, resume: bool = False, verbose: bool = False,
                   out: IO[str] | None = None) -> list[RunOutcome]:
    """Every selected arm x seed, one after the other; returns the outcomes in order.

    Args:
        exp: the validated experiment.
        arms, seeds: subsets to run (default: all of the file's).
        tracking_uri: overrides the file's ``tracking.uri`` (then ``$MLFLOW_TRACKING_URI``, then ``./mlflow.db``).
        track: log to MLflow (checked to be reachable before the first run starts).
        resume: skip runs already completed in their folder and continue interrupted ones.
        verbose: show the stages' own progress bars and DSPy output.
        out: where progress goes (default stdout).

    Raises:
        ConfigError: an arm or seed that the file does not have.
        experiments.tracking.TrackingError: the tracking store cannot be used (nothing has run yet).
    """
    out = out or sys.stdout
    if not distributed.is_main_process():  # under accelerate launch: rank 0 tracks and reports, the others train
        out, track = open(os.devnull, "w"), False  # noqa: SIM115 - lives as long as the process
    selected = [exp.arm(a) for a in arms] if arms else list(exp.arms)
    run_seeds = list(seeds) if seeds else list(exp.seeds)
    uri = resolve_tracking_uri(tracking_uri, exp.tracking_uri) if track else None
    if uri is not None:
        check_tracking_uri(uri)
    batch = uuid.uuid4().hex[:12]
    plan = [(arm, seed) for arm in selected for seed in run_seeds]
    print(f"[cotune] {exp.name}: {len(plan)} runs ({len(selected)} arms x {len(run_seeds)} seeds), budget "
          f"{exp.budget} rollouts each" + (f"; tracking: {redact(uri)}" if uri else "; tracking off"), file=out, flush=True)
    outcomes: list[RunOutcome] = []
    started = time.perf_counter()
    for i, (arm, seed) in enumerate(plan, 1):
        root = exp.runs_dir / _slug(arm.name) / f"seed-{seed}"
        if resume and distributed.on_main(_completed, root):
            print(f"[cotune] run {i}/{len(plan)}: {arm.name} seed {seed} already completed in {root}; skipped",
                  file=out, flush=True)
            continue
        print(f"[cotune] run {i}/{len(plan)}: arm {arm.name} ({arm.schedule}), seed {seed}", file=out, flush=True)
        tracker = None
        if uri is not None:
            tracker = MlflowTracking(uri, exp.mlflow_experiment, log_artifacts=exp.log_artifacts,
                                     tags={KIND_TAG: "run", "cotune.batch": batch, "experiment": exp.name},
                                     run_name=f"{arm.name}-seed{seed}")
        exists = distributed.on_main(root.exists)
        outcome = run_one(exp, arm, seed, tracker=tracker, output_dir=root, resume=resume and exists,
                          verbose=verbose, out=out)
        outcomes.append(outcome)
        test = f", test {outcome.test_score:.3f}" if outcome.test_score is not None else ""
        print(f"[cotune] run {i}/{len(plan)} done: val {outcome.val_score:.3f}{test} | {outcome.rollouts} rollouts | "
              f"{outcome.seconds:.0f}s (elapsed {time.perf_counter() - started:.0f}s)", file=out, flush=True)
    return outcomes
