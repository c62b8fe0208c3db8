"""``optimize()``: the outer loop that alternates prompt and weight stages under one metric. Reads top to bottom.

validate inputs -> settings (the user's, else the model folder's ``cotune.json``, else a size rule: see
optimizers.settings) -> the budget plan (what each stage's share buys; printed, and kept in the params) -> check that
the model can produce the program's fields at all -> prepare the run folder -> evaluate the untuned program
(stage 0) -> for each stage of the
schedule: give it its share of the remaining budget, run it (``p``: a DSPy prompt optimizer on the current
adapter; ``w``: GRPO on the LoRA adapter with the current prompts; ``s``: fine-tune on the program's own
successful traces), evaluate on the valset, save the stage (program state + adapter + record), keep the best
-> restore the best adapter, save ``best/`` and ``last/`` bundles.

Carry-over is explicit: every stage starts from the previous stage's program (instructions, demos) and the
policy's current adapter, so a weight stage trains on the prompts actually in use and a prompt stage searches
with the weights actually in use.

Several processes (``accelerate launch``, one per training GPU): every rank calls ``optimize()`` with the same
arguments. Weight and self-train stages run on every rank, data-parallel (``rl.train_weights``, ``rl.self_train``).
Everything else is single-process work done by rank 0 alone -- prompt stages, evaluations, the run folder, callbacks
(MLflow), progress -- and its outcome (the program state, the stage record, an adapter to restore) is sent to the
other ranks (:func:`rl.distributed.on_main`), so every rank carries the same program, adapter and history and returns
the same result. An error on rank 0 stops every rank.

Run folder (``output_dir``)::

    run.json                   status (running / completed / failed), params and their hash, finished stages
    .cotune.lock               held while a process runs the folder (optimizers.run_folder.RunLock)
    stages/<i>-<stage>/        program.json, adapter/, record.json, predictions.jsonl
                               (an unfinished w stage: checkpoints/ only; a finished one keeps its final adapter)
    best/  last/               bundles (manifest.json, program.json, adapter/) -- see optimizers.result

What happens to a folder that is already there (see optimizers.run_folder): another process running it ->
RunLockedError; files that are not a run -> refused; a run -> ``resume=True`` continues it (same settings only),
``overwrite=True`` moves it aside into ``<output_dir>.old-YYYYmmdd-HHMMSS``, neither -> refused. Nothing is deleted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy
import numpy as np
import torch

from metrics import as_rubric
from metrics.guards import GoldGuard
from metrics.references import reference_name
from optimizers.budget import Budget, Meter, Spend, describe_plan
from optimizers.callbacks import OptimizeCallback
from optimizers.errors import (
    CorruptRunError,
    FieldsNotProducedError,
    OptimizeError,
    OutputDirError,
    RunLockedError,
)
from optimizers.evaluate import check_parses, evaluate
from optimizers.prompt_stage import PromptStageConfig
from optimizers.result import (
    ADAPTER,
    MANIFEST,
    PROGRAM,
    OptimizeResult,
    RunInfo,
    StageRecord,
    build_manifest,
    program_with_state,
    read_json,
    save_program,
    write_json,
)
from optimizers.run_folder import RunLock, open_run_folder, set_status, stage_dir
from optimizers.schedule import arm_of, format_schedule, parse_schedule
from optimizers.settings import resolve_settings
from optimizers.stages import Stage, StageContext, build_stages, plan_run
from rl import distributed, dspy_seam
from rl.advantages import predictor_namer
from rl.atomic import atomic_dir
from rl.config import SelfTrainConfig, WeightStageConfig
from rl.weight_stage import _check_trainset

if TYPE_CHECKING:
    from rl.policy import Policy

logger = logging.getLogger(__name__)
__all__ = ["CorruptRunError", "FieldsNotProducedError", "OptimizeError", "OutputDirError", "RunLockedError", "optimize"]

FIELDS_CHECK_EXAMPLES = 16  # train examples the untuned program is run on before anything is spent
FIELDS_CHECK_MIN_RATE = 0.2  # below this parse rate the model cannot produce the program's fields


def optimize(
    program: dspy.Module,
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example] | None = None,
    *,
    metric: Callable[..., Any],
    policy: Policy,
    schedule: str = "p -> w -> p",
    prompt: PromptStageConfig | dict | None = None,
    weights: WeightStageConfig | dict | None = None,
    self_training: SelfTrainConfig | dict | None = None,
    stage_settings: dict[str, Any] | None = None,
    budget: Budget | int | dict | None = None,
    teleprompter: Any | None = None,
    prompt_lm: dspy.LM | None = None,
    reflection_lm: dspy.LM | None = None,
    gold_metric: Callable[..., Any] | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_threads: int = 16,
    eval_max_tokens: int | None = None,
    progress: bool = True,
    callbacks: Sequence[OptimizeCallback] = (),
    tags: dict[str, Any] | None = None,
    check_fields: bool = True,
) -> OptimizeResult:
    """Co-optimize the prompts and the LoRA weights of ``program`` under one metric.

    Args:
        program: any DSPy module; it is not modified.
        trainset: examples the stages learn from (``with_inputs`` set).
        valset: examples every stage is evaluated on (required: the best stage is chosen on it).
        metric: a :class:`metrics.Rubric` or any DSPy metric ``(example, pred, trace=None)``; it drives every stage.
        policy: the :class:`rl.Policy` the program runs on; its adapter is trained in place.
        schedule: stages joined by ``->``: ``p`` prompt optimization, ``w`` GRPO, ``s`` fine-tune on own traces.
        prompt: :class:`PromptStageConfig` (or a dict of its fields) for ``p`` stages.
        weights: :class:`rl.WeightStageConfig` (or dict) for ``w`` stages.
        self_training: :class:`rl.config.SelfTrainConfig` (or dict) for ``s`` stages.
            Settings left out of a dict come from the model folder's ``cotune.json``, else (the weight stage's
            learning rate) from :func:`rl.config.lora_learning_rate`, else the class default; a config object is
            taken whole. ``params["settings_sources"]`` records which setting came from where.
        stage_settings: ``{section: config or dict}`` for stage kinds added with
            :func:`optimizers.stages.register` (a built-in kind's section works too).
        budget: limit for the whole run in rollouts (int) or ``{"rollouts": R, "lm_calls": C}``; each stage gets
            an equal share of what is left. ``None``: each stage's own config decides.
        teleprompter: any DSPy teleprompter instance to use for ``p`` stages instead of ``prompt.optimizer``.
        prompt_lm, reflection_lm: proposer (MIPROv2, SIMBA) and reflection (GEPA) models; default: the policy.
        gold_metric: a held-out metric no stage optimizes (or a configured :class:`metrics.GoldGuard`); it is
            evaluated after each stage and an alert is raised when the metric's val score rises while gold falls.
        seed: seeds every stage: Python, NumPy and torch are seeded with ``seed + i`` before stage ``i``, so a
            resumed run repeats what an uninterrupted one does.
        output_dir: run folder (see the module docstring); ``None`` keeps artifacts in a temporary folder.
        resume: continue the interrupted run in ``output_dir`` (finished stages are reloaded, an interrupted
            weight stage continues from its last good checkpoint); refused when the settings differ.
        overwrite: start over when ``output_dir`` holds a run: the old run is moved aside (never deleted) into
            ``<output_dir>.old-YYYYmmdd-HHMMSS``. A folder of other files is refused even so.
        eval_threads: parallel program calls during evaluation.
        eval_max_tokens: max tokens per LM call at evaluation (default: ``weights.max_tokens``).
        progress: show progress bars.
        callbacks: :class:`OptimizeCallback` objects (MLflow tracking, Optuna pruning, ...).
        tags: free-form labels recorded in the params (e.g. ``{"task": "gsm"}``).
        check_fields: before anything is spent, run the untuned program on up to 16 train examples and refuse
            when fewer than 20% parse (:class:`FieldsNotProducedError`); ``False`` skips the check (smoke tests
            of programs the model is known not to parse).

    Returns:
        An :class:`OptimizeResult`: the best program (bound to the policy with the best adapter loaded), the
        history (baseline + one record per stage), the spend; ``result.save(dir)`` writes a bundle.

    Raises:
        OptimizeError: bad schedule, empty trainset/valset, missing valset, a non-callable metric, bad configs.
        rl.config.ModelSettingsError: the model folder's ``cotune.json`` is unreadable or has a bad setting.
        BudgetError: a budget too small for one step of a stage; :class:`PromptBudgetError` when a ``p`` stage's
            share cannot buy one useful candidate (it names the smallest budget that would).
        FieldsNotProducedError: the untuned program parses on fewer than 20% of the first train examples: the
            model cannot produce the program's fields (raised before any budget is spent).
        OutputDirError: ``output_dir`` is a file, not writable, holds other files, or holds a run and neither
            ``resume`` nor ``overwrite`` was passed; on resume: the run had other settings (named) or is completed.
        RunLockedError: another process is running ``output_dir`` (its pid and host are named).
        CorruptRunError: on resume, a file of the run (``run.json``, a stage's ``record.json`` / ``program.json`` /
            adapter) is damaged; the file is named.
        metrics.MetricError: the metric raised or returned NaN on a valset example.

    Example:
        >>> from optimizers import optimize                                        # doctest: +SKIP
        >>> from embedded import tiny_policy
        >>> from programs.tasks import last_digit
        >>> result = optimize(                                                     # doctest: +SKIP
        ...     last_digit.predict_program(), last_digit.load("train", 64), last_digit.load("val", 64),
        ...     metric=last_digit.correct, policy=tiny_policy(), schedule="p -> w", budget=800,
        ...     output_dir="runs/demo")                                               # settings: the model's
        >>> [(r.name, round(r.val_score, 2)) for r in result.history]             # doctest: +SKIP
        [('0-baseline', 0.42), ('1-p', 0.97), ('2-w', 1.0)]
        >>> answer = result.program(question="What is the last digit of 1234567?").answer  # doctest: +SKIP
    """
    ranks = distributed.ranks()  # rank 0 (or the only process) runs the single-process work
    callbacks, progress = (tuple(callbacks), progress) if ranks.main else ((), False)
    letters = _parse(schedule)
    trainset, valset = _check_data(trainset, valset)
    _check_metric_and_policy(metric, policy)
    _check_bindings(program, policy)
    rubric = as_rubric(metric)
    settings = resolve_settings(policy, seed=seed, prompt=prompt, weights=weights, self_training=self_training,
                                **(stage_settings or {}))
    budget = Budget.coerce(budget)
    stages = build_stages(letters, settings.configs, n_train=len(trainset), n_val=len(valset),
                          teleprompter=teleprompter, prompt_lm=prompt_lm, reflection_lm=reflection_lm)
    plan = plan_run(stages, budget, n_train=len(trainset), n_val=len(valset))  # refuses a share too small
    if progress:
        print("[cotune] plan: " + describe_plan(plan, budget), flush=True)
    logger.info("plan: %s", describe_plan(plan, budget))
    eval_max_tokens = eval_max_tokens or settings.weights.max_tokens
    if check_fields:
        ranks.on_main(_check_fields, program, trainset, policy, eval_max_tokens, eval_threads)
    params = _params(letters, seed, budget, settings, teleprompter, policy, plan, program, trainset, valset,
                     gold_metric, tags)
    if resume and output_dir is None:
        raise OptimizeError("resume=True needs the output_dir of the run to continue")
    temp = tempfile.TemporaryDirectory(prefix="cotune-run-") if output_dir is None else None
    root = Path(temp.name if temp is not None else output_dir)
    gold = _gold_guard(gold_metric)
    lock = RunLock(root)  # held by rank 0 (which alone writes the folder) until the run ends, however it ends
    done = ranks.on_main(open_run_folder, root, lock, params, letters, resume=resume and temp is None,
                         overwrite=overwrite)
    run = RunInfo(params=params, output_dir=None if temp else root, stages=letters, arm=params["arm"], seed=seed,
                  judges=rubric.judges)
    loop = _Loop(rubric=rubric, policy=policy, valset=valset, trainset=trainset, run=run, root=root,
                 callbacks=callbacks, gold=gold, eval_threads=eval_threads, eval_max_tokens=eval_max_tokens,
                 progress=progress, ranks=ranks, seed=seed, resume=resume)
    try:
        ranks.on_main(_notify, callbacks, "on_run_start", run)
        current, meter = _unbound_copy(program), Meter(budget)
        for index, stage in enumerate((None, *stages)):
            if index in done:  # resume: reload the finished stage and move on
                current = loop.restore(index, stage.letter if stage else "baseline", current, meter)
            else:
                current = loop.run_stage(index, stage, current, meter, stages_left=len(stages) - index + 1)
        result = loop.result(program=current, params=params)

        def complete() -> None:
            set_status(root, "completed", params, range(len(stages) + 1))
            _notify(callbacks, "on_run_end", run, result)

        ranks.on_main(complete)  # the other ranks return once rank 0's callbacks (test eval, MLflow) are done
        return result
    except BaseException as exc:
        loop.fail(exc)
        raise
    finally:
        lock.release()
        if temp is not None:
            loop.run.output_dir = None  # the temporary folder vanishes: the result must not point into it
            temp.cleanup()


# --- the loop's state and stages ----------------------------------------------------------------


class _Loop:
    """The state carried from stage to stage: history, the best stage so far, the run folder."""

    def __init__(self, *, rubric, policy, valset, trainset, run, root, callbacks, gold, eval_threads,
                 eval_max_tokens, progress, ranks: distributed.Ranks, seed: int, resume: bool) -> None:
        self.rubric, self.policy, self.valset, self.trainset = rubric, policy, valset, trainset
        self.run, self.root, self.callbacks, self.gold = run, root, callbacks, gold
        self.eval_threads, self.eval_max_tokens, self.progress = eval_threads, eval_max_tokens, progress
        self.ranks, self.seed, self.resume = ranks, seed, resume
        self.history: list[StageRecord] = []
        self.best_index = 0
        self.best_program: dspy.Module | None = None
        self.finished: set[int] = set()

    def stage_dir(self, index: int, stage: str) -> Path:
        return stage_dir(self.root, index, stage)

    def run_stage(self, index: int, stage: Stage | None, current: dspy.Module, meter: Meter,
                  stages_left: int) -> dspy.Module:
        """Run one stage (``None``: the baseline, which only evaluates) on its share, then evaluate and save it."""
        name = stage.letter if stage is not None else "baseline"
        _seed_everything(self.seed + index)  # a stage's randomness depends on (seed, index) alone: a resume repeats it
        self.ranks.on_main(_notify, self.callbacks, "on_stage_start", self.run, index, name)
        t0, before = time.perf_counter(), meter.snapshot()
        details: dict[str, Any] = {}
        note = ""
        if stage is not None:
            context = StageContext(index=index, trainset=self.trainset, valset=self.valset, rubric=self.rubric,
                                   policy=self.policy, meter=meter, folder=self.stage_dir(index, name),
                                   resume=self.resume, progress=self.progress, eval_max_tokens=self.eval_max_tokens,
                                   ranks=self.ranks, on_step=self.step_callback(index),
                                   on_rollouts=self.rollouts_callback(index, current))
            outcome = stage.run(context, current, meter.share(stages_left))
            meter.charge(outcome.spend.rollouts, outcome.spend.lm_calls)
            current, details, note = outcome.program, outcome.details, outcome.note
        self.finish(index, name, current, details, note, meter.snapshot() - before, meter.snapshot(),
                    time.perf_counter() - t0)
        return current

    def fail(self, exc: BaseException) -> None:
        """Record the failure in run.json (the finished list only grows) and tell the callbacks."""
        if self.ranks.main:  # stages an earlier attempt finished stay listed
            set_status(self.root, "failed", self.run.params, sorted(self.finished),
                       error=f"{type(exc).__name__}: {exc}")
        for cb in self.callbacks:
            try:
                cb.on_run_error(self.run, exc)
            except Exception:  # noqa: BLE001 - the original error matters more than a failing callback
                logger.exception("callback %r failed in on_run_error", cb)

    def rollouts_callback(self, index: int, program) -> Callable[[int, Any], None]:
        """Show a ``w`` or ``s`` stage's scored rollouts (rank 0's) to every OptimizeCallback."""
        name_of = predictor_namer(program)

        def show(step: int, rollouts) -> None:
            if self.ranks.main:
                for cb in self.callbacks:
                    cb.on_rollouts(self.run, index, step, rollouts, name_of)

        return show

    def step_callback(self, index: int) -> Callable[[dict[str, Any]], None]:
        """Forward a weight or self-train stage's step metrics to every OptimizeCallback."""

        def forward(metrics: dict[str, Any]) -> None:
            for cb in self.callbacks:
                cb.on_step(self.run, index, metrics)

        return forward

    # --- after every stage ------------------------------------------------------------------------

    def finish(self, index, stage, program, details, note, spend: Spend, total: Spend, seconds: float) -> None:
        """Evaluate the stage and save it (rank 0); every rank adds the record to its history."""
        record = self.ranks.on_main(self._evaluate_and_save, index, stage, program, details, note, spend, total,
                                     seconds)
        if not self.ranks.main:
            self.finished.add(record.index)
            self._add(record, program)

    def _evaluate_and_save(self, index, stage, program, details, note, spend, total, seconds) -> StageRecord:
        lm = self.policy.lm(temperature=0.0, max_tokens=self.eval_max_tokens, cache=False)
        ev = evaluate(program, self.valset, self.rubric, lm, gold_metric=self.gold.gold_score if self.gold else None,
                      num_threads=self.eval_threads)
        record = StageRecord(index=index, stage=stage, name=f"{index}-{stage}", val_score=ev.score,
                             val_components=ev.components, gold_score=ev.gold, val_errors=ev.errors,
                             spend=spend.to_dict(), total_spend=total.to_dict(), seconds=seconds,
                             adapter_version=self.policy.version, details=details, note=note)
        if self.gold is not None and ev.gold is not None:
            event = self.gold.check(record.name, ev.score, ev.gold)
            if event is not None:
                record.events.append(event.message)
                logger.warning("reward-hacking guard after stage %s: %s", record.name, event.message)
        self._save_stage(record, program, ev.rows)
        self._add(record, program)
        for cb in self.callbacks:
            cb.on_evaluation(self.run, record, ev)
        logger.info("stage %s: val %.3f (spend %s, total %s)", record.name, ev.score, spend.to_dict(), total.to_dict())
        if self.progress:
            print(f"[cotune] stage {record.name}: val {ev.score:.3f}"
                  + (f" gold {ev.gold:.3f}" if ev.gold is not None else "")
                  + f" | spent {total.rollouts} rollouts, {total.lm_calls} LM calls", flush=True)
        for cb in self.callbacks:
            cb.on_stage_end(self.run, record)
        return record

    def _save_stage(self, record: StageRecord, program, rows) -> None:
        with atomic_dir(self.stage_dir(record.index, record.stage)) as tmp:
            save_program(program, tmp / PROGRAM)
            self.policy.save_adapter(tmp / ADAPTER)
            (tmp / "predictions.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
            write_json(tmp / "record.json", record.to_dict())  # a stage folder with its record is a finished stage
        # the finished stage replaces the whole folder: a weight stage's checkpoints go, its final adapter stays
        self.finished.add(record.index)
        set_status(self.root, "running", self.run.params, sorted(self.finished))

    def _add(self, record: StageRecord, program) -> None:
        self.history.append(record)
        if self.best_program is None or record.val_score > self.history[self.best_index].val_score:
            self.best_index = len(self.history) - 1
            self.best_program = copy.deepcopy(program)
            if self.ranks.main:
                self._write_bundle("best", record.index, record.stage)

    def _write_bundle(self, name: str, index: int, stage: str) -> None:
        src = self.stage_dir(index, stage)
        with atomic_dir(self.root / name) as tmp:
            shutil.copy2(src / PROGRAM, tmp / PROGRAM)
            shutil.copytree(src / ADAPTER, tmp / ADAPTER)
            write_json(tmp / MANIFEST, build_manifest(self.run.params, self.history, self.best_index, self.policy))

    def restore(self, index: int, stage: str, current, meter: Meter):
        """Reload a stage finished by an earlier (interrupted) run: its program, adapter, record and spend."""
        src = self.stage_dir(index, stage)
        record, state, adapter = self.ranks.on_main(_read_stage, src)
        current = program_with_state(current, state)
        self.policy.load_adapter_state(adapter, version=record.adapter_version, source=str(src / ADAPTER))
        meter.charge(record.spend.get("rollouts", 0), record.spend.get("lm_calls", 0))
        self.finished.add(index)
        self._add(record, current)
        logger.info("resume: stage %s reloaded (val %.3f)", record.name, record.val_score)
        return current

    def result(self, program, params) -> OptimizeResult:
        last = self.history[-1]
        if self.ranks.main:
            self._write_bundle("last", last.index, last.stage)
        best = self.history[self.best_index]
        if best.index != last.index:  # serve the best adapter from the live policy (rank 0 reads it for every rank)
            src = self.stage_dir(best.index, best.stage) / ADAPTER
            self.policy.load_adapter_state(self.ranks.on_main(_read_adapter, src), source=str(src))
        lm = self.policy.lm(temperature=0.0, max_tokens=self.eval_max_tokens, cache=False)
        best_program = copy.deepcopy(self.best_program)
        best_program.set_lm(lm)
        last_program = copy.deepcopy(program)
        return OptimizeResult(program=best_program, policy=self.policy, history=self.history,
                              best_index=self.best_index, last_program=last_program, params=params,
                              output_dir=self.run.output_dir)


# --- helpers ------------------------------------------------------------------------------------


def _notify(callbacks: Sequence[OptimizeCallback], method: str, *args: Any) -> None:
    """Call ``method`` of every callback (rank 0 alone holds callbacks; see ``optimize``)."""
    for cb in callbacks:
        getattr(cb, method)(*args)


def _read_stage(src: Path) -> tuple[StageRecord, dict[str, Any], dict[str, torch.Tensor]]:
    """A finished stage's record, program state and adapter weights, as plain objects another rank can receive."""
    hint = f"delete the folder {str(src)!r} to run that stage again (resume=True), or pass overwrite=True"
    fields = read_json(src / "record.json", hint=hint)
    try:
        record = StageRecord(**fields)
    except TypeError as exc:
        raise CorruptRunError(f"{str(src / 'record.json')!r} is not a stage record ({exc}); {hint}",
                              path=src / "record.json") from exc
    return record, read_json(src / PROGRAM, hint=hint), _read_adapter(src / ADAPTER, hint=hint)


def _read_adapter(path: Path, hint: str = "") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    try:
        return load_file(file)
    except Exception as exc:  # noqa: BLE001 - a missing or truncated file: name it
        raise CorruptRunError(f"{str(file)!r} is missing or damaged ({type(exc).__name__}: {exc})"
                              + (f"; {hint}" if hint else ""), path=file) from exc


def _parse(schedule: str) -> tuple[str, ...]:
    from optimizers.schedule import ScheduleError

    try:
        return parse_schedule(schedule)
    except ScheduleError as exc:
        raise OptimizeError(str(exc)) from exc


def _check_data(trainset, valset) -> tuple[list, list]:
    from rl.weight_stage import TrainsetError

    trainset = list(trainset) if trainset is not None else []
    try:
        _check_trainset(trainset)
    except TrainsetError as exc:
        raise OptimizeError(f"trainset: {exc}") from exc
    if valset is None:
        raise OptimizeError("valset is required: every stage is evaluated on it and the best stage is chosen by it "
                            "(hold out some examples, e.g. 20% of your data)")
    valset = list(valset)
    if not valset:
        raise OptimizeError("valset is empty: every stage is evaluated on it; pass at least one example")
    try:
        _check_trainset(valset)
    except TrainsetError as exc:
        raise OptimizeError(f"valset: {str(exc).replace('trainset', 'valset')}") from exc
    return trainset, valset


def _gold_guard(gold_metric: Any) -> GoldGuard | None:
    """``gold_metric`` as a guard: a metric callable, or a configured :class:`metrics.GoldGuard` (e.g. action="stop")."""
    if gold_metric is None or isinstance(gold_metric, GoldGuard):
        return gold_metric
    if not callable(gold_metric):
        raise OptimizeError(f"gold_metric must be a metric callable or a metrics.GoldGuard, got {type(gold_metric).__name__}")
    return GoldGuard(gold_metric)


def _check_bindings(program: dspy.Module, policy: Policy) -> None:
    """A predictor bound to another LM would bypass the policy: its calls would be neither trained nor recorded."""
    if not isinstance(program, dspy.Module):
        raise OptimizeError(f"program must be a dspy.Module, got {type(program).__name__}")
    for name, predictor in program.named_predictors():
        lm = getattr(predictor, "lm", None)
        if lm is not None and dspy_seam.engine_of(lm) is not policy.engine:
            raise OptimizeError(f"predictor {name!r} is bound to another LM ({getattr(lm, 'model', lm)!r}); optimize() "
                                "runs every predictor on the policy: call program.set_lm(None) first")


def _check_fields(program: dspy.Module, trainset: list, policy: Policy, max_tokens: int, threads: int) -> None:
    """Refuse a program the model cannot produce: the untuned program must parse on 20% of the first train examples."""
    examples = trainset[:FIELDS_CHECK_EXAMPLES]
    lm = policy.lm(temperature=0.0, max_tokens=max_tokens, cache=False)
    check = check_parses(program, examples, lm, num_threads=min(threads, len(examples)))
    if check.rate >= FIELDS_CHECK_MIN_RATE:
        return
    fields = {name or "self": _signature_text(p.signature) for name, p in program.named_predictors()}
    listed = "; ".join(f"{name}: {sig}" for name, sig in fields.items())
    raise FieldsNotProducedError(
        f"the model cannot produce these fields: {listed} -- the untuned program parsed {check.parsed}/{check.tried} "
        f"of the first train examples at temperature 0, so no stage could learn from its runs (first failure: "
        f"{check.first_error}). Use field names and instructions the model was trained on, a model that follows "
        f"the format, or pass check_fields=False to run anyway", parsed=check.parsed, tried=check.tried,
        fields=fields, first_error=check.first_error)


def _signature_text(signature: Any) -> str:
    return f"{', '.join(signature.input_fields)} -> {', '.join(signature.output_fields)}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _unbound_copy(program: dspy.Module) -> dspy.Module:
    """A copy of the user's program with no LM bound: every stage sets the LM it needs through ``dspy.context``."""
    current = copy.deepcopy(program)
    for _, predictor in current.named_predictors():
        predictor.lm = None
    return current


def _check_metric_and_policy(metric: Any, policy: Any) -> None:
    if not callable(metric):
        raise OptimizeError(f"metric must be a Rubric or a callable (example, pred, trace=None), "
                            f"got {type(metric).__name__}")
    if policy is None or not hasattr(policy, "lm"):
        raise OptimizeError("policy must be an rl.Policy (e.g. Policy.from_pretrained(path) or "
                            "embedded.tiny_policy())")


def _params(letters, seed, budget, settings, teleprompter, policy, plan, program, trainset, valset, gold_metric,
            tags) -> dict[str, Any]:
    """The run's settings as recorded in run.json, the manifest and MLflow (their hash decides what may resume)."""
    configs = {section: (config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config))
               for section, config in settings.configs.items()}
    return {
        "schedule": format_schedule(letters), "arm": arm_of(letters), "seed": seed,
        "budget": dataclasses.asdict(budget), **configs,
        "teleprompter": type(teleprompter).__name__ if teleprompter is not None else None,
        "lora": dataclasses.asdict(policy.lora),
        "settings_sources": settings.sources, "model_settings_file": settings.model_file,
        "plan": [p.text for p in plan],
        "model": policy.name, "base_model": str(policy.base_path), "base_fingerprint": policy.base_fingerprint,
        "program_class": reference_name(type(program)),
        "n_train": len(trainset), "n_val": len(valset), "gold_metric": gold_metric is not None,
        "tags": dict(tags or {}),
    }
