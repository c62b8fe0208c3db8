"""One budget for every stage, in rollouts (program executions) and policy LM calls.

Why: prompt-only, RL-only and joint runs are only comparable at equal cost. A weight stage spends exactly
``max_rollouts``; a DSPy prompt optimizer has its own knobs (candidates, trials, metric calls) and never
promises a number of program runs. So the :class:`Meter` counts what every stage actually does and *refuses*
work past the limit:

* a rollout is a top-level call of a DSPy module (the program), counted by a DSPy callback at its start;
  a rollout that starts after the limit is refused: its LM calls raise :class:`BudgetExhausted`, so it
  spends nothing;
* an LM call is a call of the policy LM, admitted (and counted) before it reaches the engine.

The outer loop sizes each prompt optimizer to its share (:func:`fit_prompt_config`), so the refusal is a
safety net, not the normal way a stage ends. Evaluation on the valset is measurement, not optimization: it
runs with the meter paused and is not charged.

Example:
    >>> meter = Meter(Budget(rollouts=100))
    >>> meter.charge(rollouts=40, lm_calls=40)
    >>> meter.remaining()
    Budget(rollouts=60, lm_calls=None)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from optimizers.errors import BudgetError, BudgetExhausted, PromptBudgetError, StageShareError
from optimizers.prompt_stage import PromptPlan, PromptStageConfig, plan_prompt_stage, program_shape
from rl import dspy_seam
from rl.policy import Policy, PolicyLM


@dataclass(frozen=True)
class Budget:
    """Limits for a whole ``optimize()`` run; ``None`` means no limit on that unit.

    Attributes:
        rollouts: program executions (what a weight stage spends G per example, and a prompt optimizer one
            per candidate evaluation or bootstrap attempt).
        lm_calls: calls of the policy LM (a multi-module program makes several per rollout).
    """

    rollouts: int | None = None
    lm_calls: int | None = None

    def __post_init__(self) -> None:
        for name in ("rollouts", "lm_calls"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BudgetError(f"budget {name} must be a positive integer or None, got {value!r}")

    @classmethod
    def coerce(cls, value: Budget | int | dict | None) -> Budget:
        """``Budget``, an int (rollouts), a dict (``{"rollouts": 2000, "lm_calls": 5000}``) or None."""
        if value is None:
            return cls()
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise BudgetError(f"budget must be an int (rollouts), a dict or a Budget, got {value!r}")
        if isinstance(value, int):
            return cls(rollouts=value)
        if isinstance(value, dict):
            unknown = set(value) - {"rollouts", "lm_calls"}
            if unknown:
                raise BudgetError(f"unknown budget keys {sorted(unknown)}; use 'rollouts' and 'lm_calls'")
            return cls(**value)
        raise BudgetError(f"budget must be an int (rollouts), a dict or a Budget, got {type(value).__name__}")


@dataclass
class Spend:
    """Rollouts and LM calls spent (by a stage, or in total)."""

    rollouts: int = 0
    lm_calls: int = 0

    def __sub__(self, other: Spend) -> Spend:
        return Spend(self.rollouts - other.rollouts, self.lm_calls - other.lm_calls)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Meter(BaseCallback):
    """Counts rollouts and LM calls against a :class:`Budget`; refuses work past it.

    Install it for a stage with :meth:`metering`; LMs from :meth:`lm` are admitted through it.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.spent = Spend()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._paused = False
        self._shape: tuple | None = None
        self.on_rollout: Callable[[], None] | None = None

    def count_only_like(self, program: dspy.Module) -> None:
        """Count only top-level runs of modules shaped like ``program`` (its copies and candidates), not e.g. the
        proposer modules MIPROv2 or GEPA call on the same LM."""
        self._shape = program_shape(program)

    def __deepcopy__(self, memo: dict) -> Meter:  # LM and program copies share the one meter
        return self

    # --- accounting -----------------------------------------------------------------------------

    def remaining(self) -> Budget:
        def left(limit: int | None, used: int) -> int | None:
            return None if limit is None else max(0, limit - used)

        return _unchecked_budget(left(self.budget.rollouts, self.spent.rollouts),
                                 left(self.budget.lm_calls, self.spent.lm_calls))

    def share(self, stages_left: int) -> Budget:
        """An equal part of what is left for each of the ``stages_left`` stages still to run (this one included)."""
        left = self.remaining()

        def part(x: int | None) -> int | None:
            return None if x is None else x // max(1, stages_left)

        return _unchecked_budget(part(left.rollouts), part(left.lm_calls))

    def snapshot(self) -> Spend:
        with self._lock:
            return Spend(self.spent.rollouts, self.spent.lm_calls)

    def charge(self, rollouts: int = 0, lm_calls: int = 0) -> None:
        """Record work done outside the meter's own counting (a weight stage reports its exact spend)."""
        with self._lock:
            self.spent.rollouts += rollouts
            self.spent.lm_calls += lm_calls

    @property
    def exhausted(self) -> bool:
        left = self.remaining()
        return left.rollouts == 0 or left.lm_calls == 0

    # --- admission (prompt stages) ----------------------------------------------------------------

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        """DSPy callback: a module called with no module above it is one program execution (a rollout)."""
        if self._paused or dspy_seam.in_module_call():
            return
        if self._shape is not None and program_shape(instance) != self._shape:
            return
        with self._lock:
            limit = self.budget.rollouts
            admitted = limit is None or self.spent.rollouts < limit
            if admitted:
                self.spent.rollouts += 1
        self._local.refused = not admitted
        if admitted and self.on_rollout is not None:
            self.on_rollout()

    def on_module_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        if not dspy_seam.in_module_call():
            self._local.refused = False

    def admit_lm_call(self) -> None:
        """Count one LM call, or raise :class:`BudgetExhausted` when its rollout or the call budget is spent."""
        if self._paused:
            return
        if getattr(self._local, "refused", False):
            raise BudgetExhausted(f"rollout budget of {self.budget.rollouts} program executions is spent")
        with self._lock:
            limit = self.budget.lm_calls
            if limit is not None and self.spent.lm_calls >= limit:
                raise BudgetExhausted(f"LM-call budget of {limit} calls is spent")
            self.spent.lm_calls += 1

    @contextlib.contextmanager
    def metering(self) -> Iterator[Meter]:
        """Count top-level program runs for the duration (DSPy's callbacks reach into Evaluate's threads)."""
        callbacks = list(dspy.settings.get("callbacks") or []) + [self]
        with dspy.context(callbacks=callbacks):
            yield self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is counted or refused inside (evaluation is measurement, not optimization spend)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def lm(self, policy: Policy, **kwargs: Any) -> MeteredLM:
        """A policy LM whose every call is admitted by this meter."""
        kwargs.setdefault("num_retries", 0)
        lm = MeteredLM(model=policy.model_string, engine=policy.engine, **kwargs)
        lm.meter = self
        return lm


def _unchecked_budget(rollouts: int | None, lm_calls: int | None) -> Budget:
    """A Budget that may hold zeros (what is left), bypassing the positive-limit validation."""
    budget = object.__new__(Budget)
    object.__setattr__(budget, "rollouts", rollouts)
    object.__setattr__(budget, "lm_calls", lm_calls)
    return budget


class MeteredLM(PolicyLM):
    """The policy LM, with each call admitted by a :class:`Meter` first (copies share the meter)."""

    meter: Meter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.meter.admit_lm_call()
        return super().__call__(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        self.meter.admit_lm_call()
        return await super().acall(*args, **kwargs)


def fit_prompt_config(config: PromptStageConfig, rollouts: int | None, n_train: int, n_val: int) -> PromptStageConfig:
    """A prompt optimizer's own knobs sized so that its program runs fit ``rollouts`` (``None``: unchanged).

    The knobs of :func:`optimizers.prompt_stage.plan_prompt_stage`'s plan: bootstrap_rs's shuffled candidates,
    MIPROv2's trials, GEPA's ``max_metric_calls``, SIMBA's steps. The meter still enforces the exact limit.

    Raises:
        PromptBudgetError: ``rollouts`` cannot buy one useful candidate.
    """
    if rollouts is None:
        return config
    return plan_prompt_stage(config, rollouts, n_train, n_val).config


@dataclass(frozen=True)
class StagePlan:
    """What one stage of a schedule will spend its share on, worked out before the run starts.

    Attributes:
        index, stage: the stage's place in the schedule (1..n) and kind (its letter).
        share: rollouts the stage gets (an equal part of what the stages before it leave; None: no budget).
        rollouts: rollouts it is expected to spend at most (None: its own settings decide).
        text: one line, e.g. ``w: 25 GRPO steps x 16 rollouts = 400``.
        min_share: the smallest share that buys one useful unit of the stage (one GRPO step, one candidate...).
    """

    index: int
    stage: str
    share: int | None
    rollouts: int | None
    text: str
    min_share: int = dataclasses.field(default=1, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_plan(plans: list[StagePlan], budget: Budget) -> str:
    """The plan as the lines ``optimize()`` prints, e.g. ``budget 800 rollouts: p: ... | w: ...``."""
    head = f"budget {budget.rollouts} rollouts" if budget.rollouts is not None else "no budget (each stage's settings)"
    return "\n".join([head + ":"] + [f"  {p.index}. {p.text}" for p in plans])


__all__ = ["Budget", "BudgetError", "BudgetExhausted", "Meter", "MeteredLM", "PromptBudgetError", "PromptPlan",
           "Spend", "StagePlan", "StageShareError", "describe_plan", "fit_prompt_config"]
