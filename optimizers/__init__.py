"""Prompt side and outer loop of cotune: schedules and prompt stages (``optimize()`` lands next).

Public API:
    parse_schedule, arm_of, ScheduleError: ``"p -> w -> p"`` schedule strings.
    run_prompt_stage, PromptStageConfig: one interface over DSPy's prompt optimizers, driven by a rubric.
"""

from optimizers.prompt_stage import OPTIMIZERS, PromptStageConfig, PromptStageError, run_prompt_stage
from optimizers.schedule import ScheduleError, arm_of, format_schedule, parse_schedule

__all__ = [
    "OPTIMIZERS",
    "PromptStageConfig",
    "PromptStageError",
    "ScheduleError",
    "arm_of",
    "format_schedule",
    "parse_schedule",
    "run_prompt_stage",
]
