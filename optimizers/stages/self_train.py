"""Stage kind ``s``: fine-tune the adapter on the program's own successful traces (:func:`rl.self_train`).

Why a module of its own: the kind's letter, config, plan for a share and run live here and nowhere else (see
:mod:`optimizers.stages.base`). The share decides how many rollouts are sampled; the fine-tune itself costs no
rollouts. Runs on every rank (data-parallel) under several processes.
"""

from __future__ import annotations

import dataclasses

import dspy

from optimizers.budget import Budget, Spend
from optimizers.errors import StageShareError
from optimizers.stages.base import StageContext, StageKind, StageOutcome, StagePlan, register
from rl.config import SelfTrainConfig
from rl.self_train import self_train


@register
class SelfTrainStage(StageKind, letter="s", section="self_training", title="supervised fine-tune on own traces",
                     trains_weights=True, config_cls=SelfTrainConfig):
    """``s``: sample the program on train examples, keep the runs the metric accepts, fine-tune on their LM calls."""

    config: SelfTrainConfig

    def plan(self, share: int | None) -> StagePlan:
        c = self.config
        if share is not None and share < c.num_samples:
            raise StageShareError(f"below num_samples={c.num_samples}", min_rollouts=c.num_samples)
        spend = c.max_rollouts if share is None else share
        text = (f"s: {spend // c.num_samples} train examples x {c.num_samples} samples = {spend}, then fine-tune on "
                "the successful ones")
        return StagePlan(0, self.letter, share, spend, text, min_share=c.num_samples)

    def refusal(self, *, budget: int, index: int, share: int, schedule: str, reason: str, need: int) -> str:
        return f"budget of {budget} rollouts gives stage {index} (s) a share of {share}, {reason}"

    def run(self, context: StageContext, program: dspy.Module, share: Budget) -> StageOutcome:
        config = self.config
        if share.rollouts is not None:
            if share.rollouts < config.num_samples:
                note = f"skipped: {share.rollouts} rollouts left, one example needs {config.num_samples}"
                return StageOutcome(program, {"steps": 0}, note, Spend(), context.policy.version)
            config = dataclasses.replace(config, max_rollouts=share.rollouts)
        result = self_train(program, context.trainset, context.rubric, context.policy, config,
                            progress=context.progress, callbacks=[context.on_step],
                            on_rollouts=lambda rollouts: context.on_rollouts(0, rollouts))  # sampled once: step 0
        note = "" if result.rows else "no successful run to train on; adapter unchanged"
        return StageOutcome(program, dataclasses.asdict(result), note, Spend(result.rollouts, result.lm_calls),
                            context.policy.version)
