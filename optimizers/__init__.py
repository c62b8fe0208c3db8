"""Prompt side and outer loop of cotune: ``optimize()``, schedules, prompt stages, budgets, save / load / export.

Public API:
    optimize, OptimizeResult, StageRecord: the outer loop over a schedule such as ``"p -> w -> p"``.
    OptimizeCallback: hooks for tracking and tuning.
    Budget: one limit in rollouts and LM calls for every stage.
    load, export: a runnable program from a saved bundle (never running code the bundle names); a stand-alone
        bundle (optionally merged weights).
    OutputDirError, RunLockedError, CorruptRunError, ExportTargetError, LoadError: what can go wrong with a run
        folder or a bundle (see optimizers.errors and optimizers.run_folder).
    parse_schedule, arm_of, ScheduleError: ``"p -> w -> p"`` schedule strings.
    run_prompt_stage, PromptStageConfig: one interface over DSPy's prompt optimizers, driven by a rubric.
"""

from optimizers.budget import Budget, BudgetError, BudgetExhausted
from optimizers.callbacks import OptimizeCallback
from optimizers.errors import (
    CorruptRunError,
    ExportTargetError,
    LoadError,
    OptimizeError,
    OutputDirError,
    RunLockedError,
)
from optimizers.evaluate import MetricError
from optimizers.optimize import optimize
from optimizers.prompt_stage import OPTIMIZERS, PromptStageConfig, PromptStageError, run_prompt_stage
from optimizers.result import OptimizeResult, RunInfo, StageRecord, export, load
from optimizers.schedule import ScheduleError, arm_of, format_schedule, parse_schedule

__all__ = [
    "OPTIMIZERS",
    "Budget",
    "BudgetError",
    "BudgetExhausted",
    "CorruptRunError",
    "ExportTargetError",
    "LoadError",
    "MetricError",
    "OptimizeCallback",
    "OptimizeError",
    "OptimizeResult",
    "OutputDirError",
    "PromptStageConfig",
    "PromptStageError",
    "RunInfo",
    "RunLockedError",
    "ScheduleError",
    "StageRecord",
    "arm_of",
    "export",
    "format_schedule",
    "load",
    "optimize",
    "parse_schedule",
    "run_prompt_stage",
]
