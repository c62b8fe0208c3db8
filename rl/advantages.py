"""Group-relative advantages per (example, predictor), mmGRPO style, and the training rows they weight.

Why per predictor: in a multi-module program the G rollouts of one example each call every predictor
(some several times, in a loop). mmGRPO (arXiv 2508.04660) forms one group per (example, predictor):
the rollouts of that example that called that predictor. A call's advantage is its rollout's reward
minus the group's mean reward, optionally divided by a standard deviation (of the group, of the batch,
or not at all). Every call of a rollout to that predictor shares the rollout's advantage.

Groups whose rewards have zero variance carry no signal: they are counted (for logging) and their rows
dropped, so no compute is spent on a zero gradient (``drop_zero_variance=False`` keeps them with advantage 0, as
TRL does, for equal-work comparisons). :func:`flat_examples` names the examples whose G rollouts all scored the
same: the weight stage's dynamic sampling (DAPO) replaces them with other examples.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rl.rollouts import Rollout

ScaleRewards = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class Row:
    """One training row: an LM call's exact tokens and the advantage it is pushed by."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    advantage: float
    reward: float
    group: tuple[int, str]
    truncated: bool
    sampling_logprobs: tuple[float, ...] | None = None  # the sampler's, when it is not the trainer (vLLM)


@dataclass(frozen=True)
class AdvantageStats:
    groups: int
    zero_variance_groups: int
    rows: int
    rows_dropped: int


def predictor_namer(program: Any) -> Callable[[Any], str]:
    """Map a recorded call's predictor object to its name in ``program`` (``named_predictors()``)."""
    names = {id(p): name for name, p in program.named_predictors()}
    return lambda predictor: names.get(id(predictor), type(predictor).__name__ if predictor is not None else "lm")


def compute_advantages(
    rollouts: Sequence[Rollout],
    name_of: Callable[[Any], str],
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    drop_zero_variance: bool = True,
) -> tuple[list[Row], AdvantageStats]:
    """Rows with mmGRPO advantages for every call of every rollout.

    Args:
        rollouts: scored rollouts (G per example).
        name_of: maps ``LMCall.predictor`` to a predictor name (see :func:`predictor_namer`).
        scale_rewards: divide by the group's std (``"group"``), the batch's std (``"batch"``) or not (``"none"``).
        eps: added to the std before dividing.
        drop_zero_variance: drop the rows of zero-variance groups (they push nothing); ``False`` keeps them with
            advantage 0.

    Returns:
        (rows, statistics); ``stats.zero_variance_groups`` counts the flat groups either way.
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    # group -> {rollout id: reward}; a rollout counts once per group however many calls it made.
    members: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for r_id, rollout in enumerate(rollouts):
        for call in rollout.calls:
            members[(rollout.example_index, name_of(call.predictor))][r_id] = rollout.reward
    batch_std = statistics.pstdev([r.reward for r in rollouts]) if len(rollouts) > 1 else 0.0

    baseline: dict[tuple[int, str], tuple[float, float]] = {}
    zero_var = 0
    for group, rewards in members.items():
        values = list(rewards.values())
        mean = statistics.fmean(values)
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        if std == 0.0:
            zero_var += 1
            if drop_zero_variance:
                continue
        divisor = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale_rewards]
        baseline[group] = (mean, divisor)

    rows, dropped = [], 0
    for rollout in rollouts:
        for call in rollout.calls:
            group = (rollout.example_index, name_of(call.predictor))
            if group not in baseline:
                dropped += 1
                continue
            mean, divisor = baseline[group]
            rows.append(Row(call.prompt_ids, call.completion_ids, (rollout.reward - mean) / divisor, rollout.reward,
                            group, call.finish_reason == "length", call.completion_logprobs))
    return rows, AdvantageStats(len(members), zero_var, len(rows), dropped)


def flat_examples(rollouts: Sequence[Rollout]) -> list[int]:
    """The ``example_index`` of every example whose rollouts all got the same reward (all right or all wrong).

    Such an example teaches nothing this step: every (example, predictor) group it forms has zero variance.

    Example:
        >>> import dspy
        >>> runs = [Rollout(i, g, dspy.Example(), dspy.Prediction(), reward=r)
        ...         for i, rewards in enumerate([(1, 1), (0, 1), (0, 0)]) for g, r in enumerate(rewards)]
        >>> flat_examples(runs)
        [0, 2]
    """
    rewards: dict[int, set[float]] = defaultdict(set)
    for rollout in rollouts:
        rewards[rollout.example_index].add(rollout.reward)
    return [index for index, values in rewards.items() if len(values) == 1]
