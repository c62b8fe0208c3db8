"""Exceptions of the optimizers package: one class per failure kind, each message says what to do.

Why one module: ``optimize()``, the run folder and ``load()``/``export()`` share some of them (a corrupt
``program.json`` is the same failure whether a resume or a load reads it), and callers such as the CLI catch
them by class.
"""

from __future__ import annotations

from pathlib import Path


class OptimizeError(ValueError):
    """``optimize()`` was called with inputs it cannot run on (the message names the argument and the fix)."""


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
