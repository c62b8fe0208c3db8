"""Stage kind ``w``: GRPO on the policy's LoRA adapter, whole-program rollouts (:func:`rl.train_weights`).

Why a module of its own: the kind's letter, config, plan for a share and run live here and nowhere else (see
:mod:`optimizers.stages.base`). The share decides the stage's rollouts (whole GRPO steps); an LM-call share stops it
before a step that would overrun. Runs on every rank (data-parallel) under several processes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import dspy

from optimizers.budget import Budget, Spend
from optimizers.errors import StageShareError
from optimizers.stages.base import StageContext, StageKind, StageOutcome, StagePlan, register
from rl.config import WeightStageConfig
from rl.weight_stage import train_weights

logger = logging.getLogger(__name__)


@register
class WeightStage(StageKind, letter="w", section="weights", title="GRPO weight stage", trains_weights=True,
                  config_cls=WeightStageConfig):
    """``w``: GRPO steps of ``examples_per_step x num_generations`` rollouts, as many as the share buys."""

    config: WeightStageConfig

    def plan(self, share: int | None) -> StagePlan:
        c = self.config
        if share is not None and share < c.rollouts_per_step:
            raise StageShareError(f"below one GRPO step of {c.rollouts_per_step} rollouts",
                                  min_rollouts=c.rollouts_per_step,
                                  reason=f"below one GRPO step of {c.rollouts_per_step} rollouts (examples_per_step="
                                         f"{c.examples_per_step} x num_generations={c.num_generations})")
        steps = c.max_steps if share is None else share // c.rollouts_per_step
        spend = steps * c.rollouts_per_step
        text = (f"w: {steps} GRPO steps x {c.rollouts_per_step} rollouts ({c.examples_per_step} examples x "
                f"{c.num_generations} generations, lr {c.learning_rate:g}) = {spend}")
        return StagePlan(0, self.letter, share, spend, text, min_share=c.rollouts_per_step)

    def refusal(self, *, budget: int, index: int, share: int, schedule: str, reason: str, need: int) -> str:
        return (f"budget of {budget} rollouts gives stage {index} (w) a share of {share}, {reason}; raise the budget "
                f"to at least {need} or make steps smaller")

    def run(self, context: StageContext, program: dspy.Module, share: Budget) -> StageOutcome:
        config = self.config
        if share.rollouts is not None:
            rollouts = share.rollouts - share.rollouts % config.rollouts_per_step  # the budget's share decides
            if rollouts < config.rollouts_per_step:
                note = (f"skipped: {share.rollouts} rollouts left for this stage, one GRPO step needs "
                        f"{config.rollouts_per_step}")
                logger.warning("weight stage %d %s", context.index, note)
                return StageOutcome(program, {"steps": 0}, note, Spend(), context.policy.version)
            config = dataclasses.replace(config, max_rollouts=rollouts)
        if not config.checkpoint_every:
            config = dataclasses.replace(config, checkpoint_every=max(1, config.max_steps // 4))
        config = dataclasses.replace(config, seed=config.seed + context.index)
        calls = {"stage": 0, "last_step": 0}

        def on_step(metrics: dict[str, Any]) -> None:
            calls["stage"] += metrics["lm_calls"]
            calls["last_step"] = metrics["lm_calls"]
            context.on_step(metrics)

        def should_stop() -> bool:  # the LM-call share: stop before a step that would overrun it
            return share.lm_calls is not None and calls["stage"] + calls["last_step"] > share.lm_calls

        def show_rollouts(step: int, rollouts) -> tuple:  # a monitor that only shows: it raises no events
            context.on_rollouts(step, rollouts)
            return ()

        result = train_weights(program, context.trainset, context.rubric, context.policy, config,
                               output_dir=context.folder, resume=context.resume, callbacks=[on_step],
                               monitors=[show_rollouts], progress=context.progress, should_stop=should_stop)
        details = {"steps": result.steps, "config": config.to_dict(), "resumed_from": result.resumed_from,
                   "history": result.history}
        return StageOutcome(program, details, "", Spend(result.rollouts, result.lm_calls), context.policy.version)
