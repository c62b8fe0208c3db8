"""Hooks into ``optimize()``: how tracking (MLflow), tuning (Optuna) and user code watch a run.

Why a small class and not a logger: ``optimizers/`` must work with tracking off (MLflow lives in
``experiments/``), and Optuna prunes a trial by raising from a hook after a stage. Every method has a no-op
default, so a callback implements only what it needs. An exception raised by a callback ends the run: the
stages already finished stay saved in ``output_dir`` and the exception propagates (``optuna.TrialPruned``
works this way).

Example:
    >>> class PrintVal(OptimizeCallback):
    ...     def on_stage_end(self, run, record):
    ...         print(record.name, record.val_score)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimizers.evaluate import Evaluation
    from optimizers.result import OptimizeResult, RunInfo, StageRecord
    from rl.rollouts import Rollout


class OptimizeCallback:
    """Base class of ``optimize()`` callbacks; override what you need."""

    def on_run_start(self, run: RunInfo) -> None:
        """Before the first stage (after inputs are validated); ``run.params`` holds the full configuration."""

    def on_stage_start(self, run: RunInfo, index: int, stage: str) -> None:
        """Before stage ``index`` (0 is the untuned baseline evaluation, then 1..n); ``stage`` is ``p``/``w``/``s``."""

    def on_step(self, run: RunInfo, index: int, metrics: dict[str, Any]) -> None:
        """After each optimizer step of a weight (``w``) or self-train (``s``) stage."""

    def on_rollouts(self, run: RunInfo, index: int, step: int, rollouts: Sequence[Rollout],
                    predictor_name: Callable[[Any], str]) -> None:
        """After each step of a weight stage, and once after a self-training stage samples (``step`` 0, before it
        trains), with the scored rollouts (rank 0's, under several processes);
        ``predictor_name`` names a recorded call's ``predictor`` as the program does (``named_predictors()``)."""

    def on_evaluation(self, run: RunInfo, record: StageRecord, evaluation: Evaluation) -> None:
        """After a stage's evaluation on the valset, before :meth:`on_stage_end`; ``evaluation.results`` holds
        every ``(example, prediction, score)``."""

    def on_stage_end(self, run: RunInfo, record: StageRecord) -> None:
        """After a stage and its evaluation on the valset."""

    def on_run_end(self, run: RunInfo, result: OptimizeResult) -> None:
        """After the last stage, once the result is saved."""

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        """When the run ends by an exception (a crash, Ctrl-C, a pruned trial); the error then propagates."""
