"""Exceptions of the optimizers package: one class per failure kind, each message says what to do.

Why one module: ``optimize()``, the run folder and ``load()``/``export()`` share some of them (a corrupt
``program.json`` is the same failure whether a resume or a load reads it), and callers such as the CLI catch
them by class.
"""

from __future__ import annotations

from pathlib import Path


class OptimizeError(ValueError):
    """``optimize()`` was called with inputs it cannot run on (the message names the argument and the fix)."""


class FieldsNotProducedError(OptimizeError):
    """The untuned program almost never parses on the policy: the model cannot produce its output fields.

    Raised by ``optimize()`` before any budget is spent (a stage could not learn from runs that all fail the same
    way). Attributes: ``parsed`` and ``tried`` (program runs on the first train examples), ``fields`` (each
    predictor's signature), ``first_error``.
    """

    def __init__(self, message: str, *, parsed: int, tried: int, fields: dict[str, str], first_error: str) -> None:
        super().__init__(message)
        self.parsed, self.tried, self.fields, self.first_error = parsed, tried, fields, first_error


class BudgetError(ValueError):
    """A budget that cannot pay for the schedule (the message says how much one stage needs)."""


class StageShareError(BudgetError):
    """A stage's share of the budget cannot buy one useful unit of its work (one GRPO step, one prompt candidate...).
    Raised before anything is spent; ``min_rollouts`` is the smallest share (for the whole run, when raised by
    ``optimize()``) that would, ``reason`` what the share falls short of."""

    def __init__(self, message: str, *, min_rollouts: int, reason: str = "") -> None:
        super().__init__(message)
        self.min_rollouts, self.reason = min_rollouts, reason or message


class PromptBudgetError(StageShareError):
    """A prompt stage's share cannot buy one useful candidate (the untuned program and one other, each scored on
    ``minibatch_size`` val examples)."""


class BudgetExhausted(RuntimeError):
    """Raised inside a program run when the budget is spent; the stage that hits it ends with what it has."""


class OutputDirError(OptimizeError):
    """The output folder cannot be used for this run.

    It holds files that are not a cotune run, or a run that was neither resumed nor overwritten, or a run with
    different settings (on resume), or it is a file, or it is not writable.
    """


class RunLockedError(OutputDirError):
    """Another process holds the run folder's lock: it is running (or resuming) the run in that folder.

    Attributes:
        path: the run folder.
        pid, host: the process that holds the lock (``None`` when it wrote nothing readable).
    """

    def __init__(self, message: str, *, path: Path, pid: int | None, host: str | None) -> None:
        super().__init__(message)
        self.path, self.pid, self.host = path, pid, host


class LoadError(ValueError):
    """A folder that is not a cotune bundle or run, or a program that cannot be rebuilt from it."""


class CorruptRunError(OutputDirError, LoadError):
    """A file of a run or bundle (``run.json``, ``record.json``, ``program.json``, ``manifest.json``) is unreadable.

    Raised by a resume and by ``load()``/``export()`` alike, so it is both an :class:`OutputDirError` and a
    :class:`LoadError`. ``path`` is the damaged file.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class ExportTargetError(FileExistsError):
    """``export``/``save`` would replace something that is not a cotune bundle: a file, a folder of other files,
    the source run itself or a folder that contains it."""
