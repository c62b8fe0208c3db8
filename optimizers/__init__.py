"""Prompt side and outer loop of cotune: ``optimize()``, schedules, prompt stages, budgets, save / load / export.

Public API:
    optimize, OptimizeResult, StageRecord: the outer loop over a schedule such as ``"p -> w -> p"``.
    OptimizeCallback: hooks for tracking and tuning.
    Budget: one limit in rollouts and LM calls for every stage; plan_run: what each stage's share buys.
    optimizers.stages: the stage protocol and the registry of stage kinds (p, w, s; add one with ``register``).
    BudgetError, StageShareError, PromptBudgetError, FieldsNotProducedError: refusals made before any budget is
        spent.
    load, export: a runnable program from a saved bundle (never running code the bundle names); a stand-alone
        bundle (optionally merged weights).
    OutputDirError, RunLockedError, CorruptRunError, ExportTargetError, LoadError: what can go wrong with a run
        folder or a bundle (see optimizers.errors and optimizers.run_folder).
    parse_schedule, arm_of, ScheduleError: ``"p -> w -> p"`` schedule strings.
    run_prompt_stage, prompt_stage, PromptStageConfig, plan_prompt_stage: one interface over DSPy's prompt
        optimizers, driven by a rubric, sized to a share of the budget.
    resolve_settings: stage settings from the user, the model folder's cotune.json, or a size rule.
    MetricError: the metric raised or returned a non-finite value on an example (``metrics.MetricError``).
"""

from metrics import MetricError  # re-exported: the one error of a failing metric, whichever stage met it
from optimizers.budget import Budget, BudgetError, BudgetExhausted, StagePlan
from optimizers.callbacks import OptimizeCallback
from optimizers.errors import (
    CorruptRunError,
    ExportTargetError,
    FieldsNotProducedError,
    LoadError,
    OptimizeError,
    OutputDirError,
    PromptBudgetError,
    RunLockedError,
    StageShareError,
)
from optimizers.optimize import optimize
from optimizers.prompt_stage import (
    OPTIMIZERS,
    PromptPlan,
    PromptStageConfig,
    PromptStageError,
    PromptStageResult,
    plan_prompt_stage,
    prompt_stage,
    run_prompt_stage,
)
from optimizers.result import OptimizeResult, RunInfo, StageRecord, export, load
from optimizers.schedule import ScheduleError, arm_of, format_schedule, parse_schedule
from optimizers.settings import Settings, resolve_settings
from optimizers.stages import plan_run

__all__ = [
    "OPTIMIZERS",
    "Budget",
    "BudgetError",
    "BudgetExhausted",
    "CorruptRunError",
    "ExportTargetError",
    "FieldsNotProducedError",
    "LoadError",
    "MetricError",
    "OptimizeCallback",
    "OptimizeError",
    "OptimizeResult",
    "OutputDirError",
    "PromptBudgetError",
    "PromptPlan",
    "PromptStageConfig",
    "PromptStageError",
    "PromptStageResult",
    "RunInfo",
    "RunLockedError",
    "ScheduleError",
    "Settings",
    "StagePlan",
    "StageRecord",
    "StageShareError",
    "arm_of",
    "export",
    "format_schedule",
    "load",
    "optimize",
    "parse_schedule",
    "plan_prompt_stage",
    "plan_run",
    "prompt_stage",
    "resolve_settings",
    "run_prompt_stage",
]
