"""The weight stage: GRPO on the policy's LoRA adapter for a whole DSPy program. Reads top to bottom.

One step: take the next ``examples_per_step`` examples -> run the program G times on each (rollouts,
every LM call recorded) -> score each run with the one metric -> advantages per (example, predictor)
group -> one optimizer step of TRL's GRPO loss on every call's exact tokens -> bump the adapter version
-> log, maybe checkpoint. The budget is counted in rollouts (program executions).

Dynamic sampling (``dynamic_sampling=True``, DAPO, arXiv 2503.14476): a group whose G rollouts all scored the same
(all right, or all wrong) has zero advantages and teaches nothing, yet its rollouts were paid for. So the step
samples more examples until ``examples_per_step`` groups teach (at most twice as many examples per step, within the
budget), and the cursor passes over a flat example once, at its next turn, instead of paying for it again. Every
rollout sampled is counted in the budget, so at equal budget it makes fewer optimizer steps, each on full batches.
It is off by default: on the embedded tasks it bought no val gain per rollout (``benchmarks/dynamic_sampling.py``).

Example:
    >>> from rl import Policy, WeightStageConfig, train_weights                            # doctest: +SKIP
    >>> result = train_weights(program, trainset, metric, policy,                          # doctest: +SKIP
    ...                        WeightStageConfig(num_generations=8, max_rollouts=2048, learning_rate=1e-4),
    ...                        output_dir="runs/w1", callbacks=[print])
    >>> result.history[-1]["reward_mean"]                                                  # doctest: +SKIP

Data parallel: under ``accelerate launch`` with several processes every rank calls ``train_weights`` with the same
arguments. Each step's examples are split across ranks (all G runs of an example on one rank, so group statistics
stay local; ``scale_rewards="batch"`` uses the std over every rank's rewards), DDP averages the gradients, every
rank bumps its own adapter version, the logged metrics are computed over the union of the ranks' rollouts (the same
dict on every rank), and rank 0 alone writes checkpoints and shows progress. ``examples_per_step`` and the budget
are global: the same config trains on the same number of examples per step whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from rl import distributed
from rl.advantages import AdvantageStats, compute_advantages, flat_examples, predictor_namer
from rl.atomic import jsonable
from rl.checkpoint import latest_checkpoint, load_checkpoint, refuse_earlier_checkpoints, save_checkpoint
from rl.config import WeightStageConfig
from rl.errors import CotuneRLError
from rl.grpo import GRPOUpdater
from rl.rollouts import Rollout, RolloutThreads, run_rollouts

StepCallback = Callable[[dict[str, Any]], None]
# A monitor sees each step's rollouts (completion texts, rewards, components) and returns events, e.g.
# metrics.DegeneracyMonitor via ``lambda step, rollouts: monitor.observe(step, texts(rollouts))[1]``.
StepMonitor = Callable[[int, list[Rollout]], Iterable[Any] | None]

if TYPE_CHECKING:
    from rl.policy import Policy

logger = logging.getLogger(__name__)
ADVANTAGE_EPS = 1e-4  # added to the std before dividing (rl.advantages' default)


class TrainsetError(CotuneRLError, ValueError):
    """The trainset is empty or holds examples the program cannot be called with."""


@dataclass
class WeightStageResult:
    """What a weight stage did: its per-step metrics and its spend."""

    steps: int
    rollouts: int
    lm_calls: int
    adapter_version: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    events: list[Any] = field(default_factory=list)


class DataCursor:
    """Walks the trainset in seeded per-epoch permutations; its whole state is (epoch, position, skip).

    ``skip`` holds examples to pass over once, at their next turn: dynamic sampling marks the examples whose last
    group was all-equal. Passing over an example clears its mark, so :meth:`take` always ends.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0, skip: Iterable[int] = ()) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self.skip = set(skip)
        self.skipped = 0  # examples passed over so far (for the step metrics)
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: random.Random(f"cursor/{self.seed}/{epoch}").sample(range(self.size), self.size)}
        return self._orders[epoch]

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            index = self._order(self.epoch)[self.position]
            self.position += 1
            if index in self.skip:
                self.skip.discard(index)
                self.skipped += 1
            else:
                out.append(index)
        return out

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if self.skip:
            state["skip"] = sorted(self.skip)
        return state


def _check_trainset(trainset: Sequence[dspy.Example]) -> None:
    if not trainset:
        raise TrainsetError("the trainset is empty: a weight stage needs at least one example")
    for i, ex in enumerate(trainset):
        if not isinstance(ex, dspy.Example):
            raise TrainsetError(f"trainset[{i}] is a {type(ex).__name__}, not a dspy.Example")
        try:
            inputs = ex.inputs()
        except ValueError as exc:
            raise TrainsetError(f"trainset[{i}] has no input fields; call .with_inputs(...) on it") from exc
        if not inputs:
            raise TrainsetError(f"trainset[{i}] has no input fields; call .with_inputs(...) on it")


def _summary(rollouts: list[Rollout]) -> dict[str, Any]:
    """What the step's metrics need from some rollouts, as plain lists: cheap to gather from every rank."""
    calls = [c for r in rollouts for c in r.calls]
    components: dict[str, list[float]] = defaultdict(list)
    for r in rollouts:
        for name, value in r.components.items():
            components[name].append(value)
    return {"rewards": [r.reward for r in rollouts], "failed": [r.error is not None for r in rollouts],
            "lengths": [len(c.completion_ids) for c in calls],
            "truncated": [c.finish_reason == "length" for c in calls], "components": dict(components)}


def _merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of the union of the ranks' rollouts (rank order)."""
    out: dict[str, Any] = {"rewards": [], "failed": [], "lengths": [], "truncated": [], "components": defaultdict(list)}
    for summary in summaries:
        for key in ("rewards", "failed", "lengths", "truncated"):
            out[key] += summary[key]
        for name, values in summary["components"].items():
            out["components"][name] += values
    return out


def _step_metrics(summary: dict[str, Any], adv_stats: AdvantageStats, update: dict[str, Any], with_kl: bool
                  ) -> dict[str, Any]:
    rewards, lengths = summary["rewards"], summary["lengths"]
    metrics: dict[str, Any] = {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "parse_failure_rate": sum(summary["failed"]) / len(rewards),
        "lm_calls": len(lengths),
        "tokens_generated": sum(lengths),
        "completion_tokens_mean": statistics.fmean(lengths) if lengths else 0.0,
        "truncated_rate": sum(summary["truncated"]) / max(1, len(lengths)),
        "groups": adv_stats.groups,
        "zero_variance_groups": adv_stats.zero_variance_groups,
        "rows": adv_stats.rows,
    }
    metrics.update({f"reward/{name}": statistics.fmean(values) for name, values in summary["components"].items()})
    # The same keys every step (NaN when no group had signal and no update was made), so that logged curves align.
    keys = ("loss", "entropy", "grad_norm", "lr", "clip_ratio/region_mean") + (("kl",) if with_kl else ())
    for key in keys:
        metrics["clip_ratio" if key.startswith("clip_ratio") else key] = update.get(key, float("nan"))
    for key in ("is_ratio_mean", "is_masked_rows"):  # vLLM rollouts: the off-policy correction (rl.grpo)
        if key in update:
            metrics[key] = update[key]
    metrics["updated"] = bool(update)
    return metrics


def train_weights(
    program: dspy.Module,
    trainset: Sequence[dspy.Example],
    metric: Callable,
    policy: Policy,
    config: WeightStageConfig | None = None,
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[StepCallback] = (),
    monitors: Sequence[StepMonitor] = (),
    progress: bool = True,
    stop_after_steps: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> WeightStageResult:
    """Train ``policy``'s LoRA adapter with GRPO so that ``program`` scores higher under ``metric``.

    Args:
        program: the DSPy program; its predictors must use the policy's LM (set via ``dspy.context`` here).
        trainset: training examples (inputs set).
        metric: a rubric (``.reward(example, pred, trace) -> Score``) or any DSPy metric ``(example, pred, trace)``.
        policy: the :class:`rl.Policy` to train in place; its version advances after every update.
        config: settings; the budget is ``config.max_rollouts`` program executions.
        output_dir: where checkpoints go (``<output_dir>/checkpoints``); required for checkpointing and resume.
        resume: continue from the latest checkpoint in ``output_dir``. Without it, an ``output_dir`` that holds
            checkpoints is refused (:class:`rl.checkpoint.CheckpointsExistError`), never written over.
        callbacks: called with each step's metrics dict (under several processes: on every rank, with the same
            dict; a callback that logs somewhere should check ``rl.distributed.is_main_process()``).
        monitors: called with (step, rollouts) after each step; the events they return (e.g. reward-hacking or
            degeneracy alerts from ``metrics``) are logged, counted in the step's ``guard_events`` metric and
            returned in ``result.events``. Under several processes each rank's monitors see that rank's rollouts
            and the events of every rank are returned on every rank.
        progress: show a progress bar (rank 0 only).
        stop_after_steps: end after this many steps *in this call* (the budget is unchanged; used to stage runs).
        should_stop: asked before each step; ``True`` ends the stage there (e.g. an outer LM-call budget is spent).
            Under several processes the stage stops on every rank when it says ``True`` on any rank.

    Raises:
        TrainsetError: empty trainset or examples without inputs.
        rl.CheckpointsExistError: ``output_dir`` holds checkpoints and ``resume`` is off.
        metrics.MetricError: the metric raised or returned NaN (the example is named).
        ValueError: under several processes, fewer ``examples_per_step`` than processes.
    """
    config = config or WeightStageConfig()
    _check_trainset(trainset)
    if not callable(metric):
        raise TypeError(f"metric must be callable (a rubric or a DSPy metric), got {type(metric).__name__}")
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir that holds the checkpoints")
    ckpt_root = Path(output_dir) / "checkpoints" if output_dir is not None else None
    if ckpt_root is not None and not resume:
        refuse_earlier_checkpoints(ckpt_root)
    ranks = distributed.ranks()  # several processes (accelerate launch / torchrun) or one; the updater agrees
    updater = GRPOUpdater(policy, config.updater_settings(), config.max_steps)
    if config.examples_per_step < ranks.world:
        updater.close()
        raise ValueError(f"examples_per_step={config.examples_per_step} is below the {ranks.world} training "
                         "processes: each rank needs at least one example (all G runs of an example stay on one rank)")
    run = _StageRun(program, trainset, metric, policy, config, updater, ranks, ckpt_root)
    if resume:  # every rank resumes from the checkpoint rank 0 sees
        run.restore(ranks.broadcast(latest_checkpoint(ckpt_root)))
    end = config.max_steps if stop_after_steps is None else min(config.max_steps, run.step + stop_after_steps)
    bar = _progress(progress and ranks.main, run.step, config.max_steps)
    try:
        # the budget ends the stage: with dynamic sampling a step may spend more than rollouts_per_step
        while run.step < end and run.rollouts_done + config.rollouts_per_step <= config.max_rollouts:
            if ranks.any(should_stop is not None and should_stop()):
                logger.info("weight stage: stopped before step %d by should_stop", run.step + 1)
                break
            t0 = time.perf_counter()
            rollouts, drawn, skipped = run.sample()
            t1 = time.perf_counter()
            summary, rows, adv_stats, tokens_trained = run.score(rollouts)
            update = run.update(rows, adv_stats.rows)
            t2 = time.perf_counter()
            metrics = run.record(rollouts, summary, adv_stats, update, monitors, seconds=(t1 - t0, t2 - t1),
                                 examples_sampled=drawn, examples_skipped=skipped,
                                 tokens_trained=tokens_trained)
            for callback in callbacks:
                callback(metrics)
            _show(bar, metrics)
            run.checkpoint()
            run.step += 1
    finally:
        if bar is not None:
            bar.close()
        run.threads.close()
        updater.close()
    return WeightStageResult(steps=len(run.history), rollouts=run.rollouts_done, lm_calls=run.calls_done,
                             adapter_version=policy.version, history=run.history, resumed_from=run.resumed_from,
                             events=run.events)


class _StageRun:
    """One weight stage's state and its step, in the order a step runs: sample, score, update, record, checkpoint.

    Collectives go through ``ranks`` (:class:`rl.distributed.Ranks`), which are no-ops in a single process.
    """

    def __init__(self, program, trainset, metric, policy: Policy, config: WeightStageConfig, updater: GRPOUpdater,
                 ranks: distributed.Ranks, ckpt_root: Path | None) -> None:
        self.program, self.trainset, self.metric, self.policy = program, trainset, metric, policy
        self.config, self.updater, self.ranks, self.ckpt_root = config, updater, ranks, ckpt_root
        self.cursor = DataCursor(len(trainset), config.seed)
        self.history: list[dict[str, Any]] = []
        self.events: list[Any] = []
        self.step = self.rollouts_done = self.calls_done = 0
        self.resumed_from: int | None = None
        self.lm = policy.lm(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                            cache=False)
        self.name_of = predictor_namer(program)
        # batch scaling needs the std over every rank's rewards: advantages unscaled here, divided in score()
        self.local_scale = "none" if ranks.parallel and config.scale_rewards == "batch" else config.scale_rewards
        self.threads = RolloutThreads()  # the rollouts' threads, kept for every step of this stage, closed at its end

    def restore(self, ckpt: Path | None) -> None:
        """Continue from a checkpoint: step, history, spend, data cursor, adapter and optimizer state."""
        if ckpt is None:
            return
        state = load_checkpoint(ckpt, self.policy, self.updater)
        self.step, self.history = state["step"], state["history"]
        self.rollouts_done, self.calls_done = state["rollouts"], state["lm_calls"]
        self.cursor = DataCursor(len(self.trainset), self.config.seed, **state["cursor"])
        self.resumed_from = self.step

    def sample(self) -> tuple[list[Rollout], int, int]:
        """G rollouts of each of the next ``examples_per_step`` examples (this rank's share), how many examples were
        drawn and how many the cursor passed over.

        With dynamic sampling (DAPO), an example whose G rollouts all scored the same teaches nothing: the cursor
        passes over it at its next turn, and more examples are sampled until ``examples_per_step`` of them teach,
        the step has drawn twice ``examples_per_step``, or the budget is spent. Every rollout sampled counts.
        """
        config = self.config
        skipped_before = self.cursor.skipped
        rollouts: list[Rollout] = []
        drawn, informative = 0, 0
        wanted = config.examples_per_step
        while wanted > 0:
            indices = self.cursor.take(wanted)  # the same global indices on every rank
            local = self.ranks.shard(indices)
            first = len(rollouts) // config.num_generations  # this rank's examples so far in this step
            new = run_rollouts(
                self.program, [self.trainset[i] for i in local], self.lm, self.metric, config.num_generations,
                format_failure_score=config.format_failure_score,
                num_threads=1 if config.deterministic else config.num_threads,
                tag=self.ranks.tag((config.seed, self.step)), first_index=first, threads=self.threads,
            )
            rollouts += new
            drawn += len(indices)
            if not config.dynamic_sampling:
                break
            flat = [local[i - first] for i in flat_examples(new)]
            # every rank marks every rank's flat examples: the cursors stay identical
            self.cursor.skip.update(i for rank_flat in self.ranks.gather(flat) for i in rank_flat)
            informative += len(indices) - len(flat)
            affordable = (config.max_rollouts - self.rollouts_done) // config.num_generations - drawn
            wanted = min(config.examples_per_step - informative, 2 * config.examples_per_step - drawn, affordable)
        return rollouts, drawn, self.cursor.skipped - skipped_before

    def score(self, rollouts: list[Rollout]) -> tuple[dict[str, Any], list, AdvantageStats, int]:
        """The step's summary over every rank, this rank's training rows, and the advantage counts over every rank."""
        summary = _merge(self.ranks.gather(_summary(rollouts)))
        rows, adv_stats = compute_advantages(rollouts, self.name_of, self.local_scale, eps=ADVANTAGE_EPS)
        if self.ranks.parallel and self.config.scale_rewards == "batch":
            rewards = summary["rewards"]
            divisor = (statistics.pstdev(rewards) if len(rewards) > 1 else 0.0) + ADVANTAGE_EPS
            rows = [dataclasses.replace(r, advantage=r.advantage / divisor) for r in rows]
        *counts, tokens_trained = (int(v) for v in self.ranks.all_reduce(
            [*dataclasses.astuple(adv_stats), sum(len(r.completion_ids) for r in rows)]))
        return summary, rows, AdvantageStats(*counts), tokens_trained

    def update(self, rows: list, rows_on_any_rank: int) -> dict[str, Any]:
        """GRPO's optimizer step(s) on the rows; the adapter's version advances (every rank takes part when any rank
        has rows: DDP and TRL's metrics need it)."""
        update: dict[str, Any] = {}
        if rows_on_any_rank:
            with self.policy.lock:
                # one batch (old log-probs frozen before the first update) for every iteration over these rows
                batch = self.updater.to_batch(rows)
                for _ in range(self.config.num_iterations):
                    update = self.updater.step(batch)
            self.policy.bump_version()
        return update

    def record(self, rollouts, summary, adv_stats, update, monitors, *, seconds: tuple[float, float],
               examples_sampled: int, examples_skipped: int, tokens_trained: int) -> dict[str, Any]:
        """The step's metrics (the same dict on every rank) and the monitors' events, added to the history."""
        self.rollouts_done += len(summary["rewards"])
        metrics = _step_metrics(summary, adv_stats, update, with_kl=self.config.beta > 0)
        self.calls_done += metrics["lm_calls"]
        step_events = [e for monitor in monitors for e in (monitor(self.step + 1, rollouts) or ())]
        step_events = [e for rank_events in self.ranks.gather(step_events) for e in rank_events]
        seconds = tuple(self.ranks.all_reduce(seconds, "max"))  # the step waits for the slowest rank
        for event in step_events if self.ranks.main else ():
            logger.warning("weight stage step %d: %s", self.step + 1, getattr(event, "message", event))
        self.events += step_events
        metrics.update(step=self.step + 1, rollouts=self.rollouts_done, total_lm_calls=self.calls_done,
                       adapter_version=self.policy.version, seconds_rollout=seconds[0], seconds_update=seconds[1],
                       guard_events=len(step_events), examples_sampled=examples_sampled,
                       examples_skipped=examples_skipped, tokens_trained=tokens_trained)
        self.history.append(metrics)
        return metrics

    def checkpoint(self) -> None:
        """Every ``checkpoint_every`` steps: one copy of the adapter, optimizer state and cursor (rank 0 writes)."""
        every = self.config.checkpoint_every
        if self.ckpt_root is None or not every or (self.step + 1) % every:
            return
        trainer_state = self.updater.state_dict()  # every rank: under ZeRO it gathers the optimizer partitions
        if self.ranks.main:  # the ranks hold identical weights (and optimizer state, or its partitions): one copy
            save_checkpoint(self.ckpt_root, self.step + 1, self.policy, self.updater, {
                "cursor": self.cursor.state(), "history": jsonable(self.history),
                "rollouts": self.rollouts_done, "lm_calls": self.calls_done, "config": self.config.to_dict()},
                trainer_state=trainer_state)
        self.ranks.barrier()  # nobody moves on (or returns and reads it) before the checkpoint is complete


def _show(bar, metrics: dict[str, Any]) -> None:
    if bar is not None:
        bar.update(1)
        shown = {"reward": f"{metrics['reward_mean']:.3f}"}
        if "kl" in metrics:
            shown["kl"] = f"{metrics['kl']:.3g}"
        bar.set_postfix(shown)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="weight stage (GRPO)", unit="step")
