"""The ``s`` stage: fine-tune the adapter on the program's own successful traces (BootstrapFinetune style).

Sample the whole program a few times per training example, keep the runs the metric accepts, and train the
LoRA adapter to reproduce every LM call of those runs (prompt -> completion, on the exact token ids the
engine recorded, so training sees the prompts actually used).

Why through the GRPO updater: with every row's advantage fixed at 1 and no clipping active (one pass per
batch), TRL's GRPO loss is the mean token log-likelihood of the completions, i.e. supervised fine-tuning.
Reusing :class:`rl.grpo.GRPOUpdater` keeps one training seam (TRL's loss, micro-batching, LoRA, the
optimizer) instead of a second hand-written loop. This is rejection-sampling fine-tuning (STaR/RFT), which
is what DSPy's BootstrapFinetune does with an external fine-tuning API.

Several processes (``accelerate launch``): every rank samples its share of the examples, the ranks exchange their
kept rows so that each holds the same list, and each optimizer step's rows are split across the ranks (DDP averages
the gradients; the token count is global): the same update one process would make on those rows.

Example:
    >>> result = self_train(program, trainset, metric, policy, SelfTrainConfig(num_samples=4))  # doctest: +SKIP
    >>> result.rows, result.history[-1]["loss"]                                                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dspy

from rl import distributed
from rl.advantages import Row
from rl.config import SelfTrainConfig
from rl.grpo import GRPOUpdater
from rl.rollouts import Rollout, run_rollouts
from rl.weight_stage import _check_trainset

if TYPE_CHECKING:
    from rl.policy import Policy

__all__ = ["SelfTrainResult", "self_train"]  # its config, SelfTrainConfig, lives in rl.config

logger = logging.getLogger(__name__)


@dataclass
class SelfTrainResult:
    rollouts: int
    lm_calls: int
    kept_rollouts: int
    rows: int
    steps: int
    adapter_version: int
    history: list[dict[str, Any]] = field(default_factory=list)


def self_train(
    program: dspy.Module,
    trainset: Sequence[dspy.Example],
    metric: Callable,
    policy: Policy,
    config: SelfTrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    on_rollouts: Callable[[Sequence[Rollout]], Any] | None = None,
    progress: bool = True,
) -> SelfTrainResult:
    """Sample ``program`` on ``trainset``, keep the runs ``metric`` accepts, and fine-tune on their LM calls.

    ``callbacks`` get each optimizer step's metrics; ``on_rollouts`` gets this rank's scored runs once, after
    sampling and before training (tracking logs a few as traces).

    Raises:
        rl.weight_stage.TrainsetError: empty trainset or examples without inputs.
        metrics.MetricError: the metric raised or returned NaN.
    """
    config = config or SelfTrainConfig()
    _check_trainset(trainset)
    rng = random.Random(f"self-train/{config.seed}")
    n = min(len(trainset), config.examples)
    examples = [trainset[i] for i in rng.sample(range(len(trainset)), n)]
    ranks = distributed.ranks()
    examples = ranks.shard(examples)  # each rank samples its share; its own seeds, as in the weight stage
    lm = policy.lm(temperature=config.temperature, max_tokens=config.max_tokens, cache=False)
    rollouts = run_rollouts(program, examples, lm, metric, config.num_samples, num_threads=config.num_threads,
                            tag=ranks.tag(("self-train", config.seed)))
    if on_rollouts is not None:
        on_rollouts(rollouts)
    kept = [r for r in rollouts if r.error is None and r.reward >= config.success_threshold]
    calls = [(r.example_index, r.reward, tuple(c.prompt_ids), tuple(c.completion_ids), c.finish_reason == "length")
             for r in kept for c in r.calls if c.completion_ids]  # plain data: cheap to send to the other ranks
    counts = [len(rollouts), len(kept), sum(len(r.calls) for r in rollouts), sum(r.reward for r in rollouts)]
    calls = [c for part in ranks.gather(calls) for c in part]  # every rank's kept calls, in rank order
    counts = ranks.all_reduce(counts)  # and the totals
    n_rollouts, n_kept, lm_calls = (int(c) for c in counts[:3])
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    rows: list[Row] = []
    for example_index, reward, prompt_ids, completion_ids, truncated in calls:
        if (prompt_ids, completion_ids) in seen:
            continue
        seen.add((prompt_ids, completion_ids))
        rows.append(Row(prompt_ids=prompt_ids, completion_ids=completion_ids, advantage=1.0, reward=reward,
                        group=(example_index, "sft"), truncated=truncated))
    logger.info("self-train: %d/%d runs kept, %d distinct LM calls to train on", n_kept, n_rollouts, len(rows))
    result = SelfTrainResult(rollouts=n_rollouts, lm_calls=lm_calls, kept_rollouts=n_kept, rows=len(rows),
                             steps=0, adapter_version=policy.version)
    if not rows:
        logger.warning("self-train: no run reached success_threshold=%s; the adapter is unchanged",
                       config.success_threshold)
        return result

    steps_per_epoch = -(-len(rows) // config.batch_size)
    updater = GRPOUpdater(policy, config.updater_settings(), steps_per_epoch * config.epochs)
    bar = _progress(progress, steps_per_epoch * config.epochs)
    try:
        for epoch in range(config.epochs):
            order = random.Random(f"self-train/{config.seed}/{epoch}").sample(rows, len(rows))
            for start in range(0, len(order), config.batch_size):
                chunk = order[start : start + config.batch_size]
                with policy.lock:  # under several processes each rank trains on its share of the step's rows
                    update = updater.step(updater.to_batch(ranks.shard(chunk)))
                result.steps += 1
                metrics = {"step": result.steps, "epoch": epoch + 1, "loss": update["loss"],
                           "grad_norm": update["grad_norm"], "rows": len(chunk),
                           "kept_rate": n_kept / n_rollouts, "reward_mean": counts[3] / n_rollouts}
                result.history.append(metrics)
                for callback in callbacks:
                    callback(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{update['loss']:.3f}")
        policy.bump_version()
    finally:
        if bar is not None:
            bar.close()
        updater.close()
    result.adapter_version = policy.version
    return result


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="self-train (SFT on own traces)", unit="step")
