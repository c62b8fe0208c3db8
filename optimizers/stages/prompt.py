"""Stage kind ``p``: a DSPy prompt optimizer (bootstrap_rs, MIPROv2, GEPA, SIMBA, random demos) on the current adapter.

Why a module of its own: the kind's letter, config, plan for a share and run live here and nowhere else (see
:mod:`optimizers.stages.base`). The search itself is :func:`optimizers.prompt_stage.prompt_stage`; this module sizes it
to the share, meters every program run, and hands the result on. Under several processes the search runs on rank 0
alone and the program travels to the other ranks as its saved state.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import dspy

from optimizers.budget import Budget, Meter, Spend
from optimizers.errors import PromptBudgetError
from optimizers.prompt_stage import PromptStageConfig, plan_prompt_stage, prompt_stage
from optimizers.result import program_state, program_with_state
from optimizers.stages.base import StageContext, StageKind, StageOutcome, StagePlan, register

logger = logging.getLogger(__name__)


@register
class PromptStage(StageKind, letter="p", section="prompt", title="prompt optimization", trains_weights=False,
                  config_cls=PromptStageConfig):
    """``p``: search instructions and demos with a DSPy prompt optimizer, sized to the stage's share."""

    def __init__(self, config: PromptStageConfig, *, n_train: int, n_val: int, teleprompter: Any | None = None,
                 prompt_lm: dspy.LM | None = None, reflection_lm: dspy.LM | None = None, **_: Any) -> None:
        self.config, self.n_train, self.n_val = config, n_train, n_val
        self.teleprompter, self.prompt_lm, self.reflection_lm = teleprompter, prompt_lm, reflection_lm

    def plan(self, share: int | None) -> StagePlan:
        plan = plan_prompt_stage(self.config, share, self.n_train, self.n_val, teleprompter=self.teleprompter)
        return StagePlan(0, self.letter, share, plan.cost, f"p: {plan.describe()}", min_share=self._min_share())

    def _min_share(self) -> int:
        try:
            plan_prompt_stage(self.config, 1, self.n_train, self.n_val, teleprompter=self.teleprompter)
        except PromptBudgetError as exc:
            return exc.min_rollouts
        return 1

    def refusal(self, *, budget: int, index: int, share: int, schedule: str, reason: str, need: int) -> str:
        return (f"budget of {budget} rollouts gives stage {index} (p) a share of {share}, which cannot buy one "
                f"useful prompt candidate: {reason}. The smallest budget for {schedule} that buys it is {need} "
                f"rollouts; or lower prompt.minibatch_size (now {self.config.minibatch_size}: the fewest val "
                "examples a candidate is scored on)")

    def run(self, context: StageContext, program: dspy.Module, share: Budget) -> StageOutcome:
        found, details, note, spent = context.ranks.on_main(self._search, context, program, share)
        if context.ranks.parallel:  # every rank continues from rank 0's program, sent as its saved state
            found = program_with_state(program, found)
        return StageOutcome(found, details, note, Spend(*spent), context.policy.version)

    def _search(self, context: StageContext, program: dspy.Module, share: Budget):
        """Run the prompt optimizer (on rank 0 alone); under several processes the program travels as its state."""
        name = type(self.teleprompter).__name__ if self.teleprompter is not None else self.config.optimizer
        meter = Meter(share)
        meter.count_only_like(program)
        lm = meter.lm(context.policy, temperature=0.0, max_tokens=context.eval_max_tokens, cache=False)
        bar = _bar(context.progress, share.rollouts, f"prompt stage ({name})")
        meter.on_rollout = (lambda: bar.update(1)) if bar is not None else None
        details: dict[str, Any] = {"optimizer": name, "share": dataclasses.asdict(share)}
        try:
            with meter.metering():
                outcome = prompt_stage(program, context.trainset, context.valset, context.rubric, lm=lm,
                                       config=self.config, rollouts=share.rollouts, teleprompter=self.teleprompter,
                                       prompt_lm=self.prompt_lm, reflection_lm=self.reflection_lm)
            program, note = outcome.program, outcome.note
            details.update(config=dataclasses.asdict(outcome.plan.config), **outcome.details())
        except PromptBudgetError as exc:  # what earlier stages left cannot buy a candidate: nothing was spent
            note = f"skipped: {exc}"
            logger.warning("prompt stage %s", note)
            details["config"] = dataclasses.asdict(self.config)
        finally:
            if bar is not None:
                bar.close()
        spent = (meter.spent.rollouts, meter.spent.lm_calls)
        return (program_state(program) if context.ranks.parallel else program), details, note, spent


def _bar(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rollout")
