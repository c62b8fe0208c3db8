"""A schedule's stages built from the registry, and the budget plan that shares the budget among them.

Why here and not in :mod:`optimizers.budget`: planning asks each stage kind what a share buys, so it sits beside the
registry and imports the meter's module, never the other way round (no cycle, no lazy import).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from optimizers.budget import Budget, StagePlan
from optimizers.errors import StageShareError
from optimizers.stages.base import KINDS, Stage


def build_stages(stages: Sequence[Any], configs: dict[str, Any], *, n_train: int, n_val: int,
                 **extras: Any) -> list[Stage]:
    """Stage objects for a schedule: each letter's kind bound to its section's config (the class default when
    ``configs`` has none); stage objects pass through. ``extras`` (teleprompter, prompt_lm, ...) go to every kind,
    which keeps what it uses."""
    out = []
    for stage in stages:
        if isinstance(stage, str):
            kind = KINDS[stage]
            config = configs.get(kind.section)
            out.append(kind(config if config is not None else kind.config_cls(), n_train=n_train, n_val=n_val,
                            **extras))
        else:
            out.append(stage)
    return out


def plan_run(stages: Sequence[Any], budget: Budget, *, n_train: int, n_val: int, teleprompter: Any | None = None,
             **configs: Any) -> list[StagePlan]:
    """The budget plan of a schedule: each stage's share and what it buys, as the run will give them out.

    The one budget rule: each stage gets an equal part of what is left when it starts (:meth:`Meter.share`), and
    what a stage is planned not to spend is left to the stages after it. The same shares decide the up-front
    refusal: a stage whose share is below its smallest useful share is refused here, before anything is spent.

    Args:
        stages: stage objects (:class:`optimizers.stages.Stage`), or letters with their configs passed by section
            (``prompt=``, ``weights=``, ``self_training=``, or any registered kind's section).
        budget: the run's budget.
        n_train, n_val: examples available to the stages.
        teleprompter: a user teleprompter for ``p`` stages (it sizes itself).

    Raises:
        StageShareError: a stage's share cannot buy one useful unit of its work (:class:`PromptBudgetError` for a
            ``p`` stage); ``min_rollouts`` is the smallest budget for the whole schedule that would.
    """
    stages = build_stages(stages, configs, n_train=n_train, n_val=n_val, teleprompter=teleprompter)
    schedule = " -> ".join(stage.letter for stage in stages)
    plans: list[StagePlan] = []
    refusals: list[tuple[StageShareError, str, int]] = []
    left = budget.rollouts
    for i, stage in enumerate(stages, 1):
        share = None if left is None else left // (len(stages) - i + 1)
        try:
            plan = dataclasses.replace(stage.plan(share), index=i)
        except StageShareError as exc:  # the stage would be skipped, spending nothing: plan on, to name them all
            need = exc.min_rollouts * len(stages)
            refusals.append((exc, stage.refusal(budget=budget.rollouts, index=i, share=share, schedule=schedule,
                                                reason=exc.reason, need=need), need))
            plan = StagePlan(i, stage.letter, share, 0, f"{stage.letter}: refused ({exc.reason})")
        plans.append(plan)
        if left is not None:
            left -= plan.rollouts if plan.rollouts is not None else share
    if refusals:
        first, need = refusals[0][0], max(n for _, _, n in refusals)
        text = refusals[0][1] + "".join(f". Also, {t}" for _, t, _ in refusals[1:])
        raise type(first)(text, min_rollouts=need, reason=first.reason) from first
    return plans
