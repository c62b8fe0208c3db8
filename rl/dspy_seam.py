"""Every use of DSPy's internals in cotune, in one small module: what we read of DSPy's context and flags, and the one
thing we change (tool-error tracebacks shown to the LM name no install folder).

Why: DSPy promises its public API (``dspy.LM``, ``dspy.context``, ``dspy.Module``, the custom-engine contract), not
the settings keys its modules set, how it carries context into threads, or the flags its optimizers read. cotune
depends on a few of those; each is a small named function here, so the rest of the code reads as our logic and a DSPy
upgrade has one file to check. ``tests/rl/test_dspy_seam.py`` is the contract test: one test per function, failing by
name when the installed DSPy no longer does what the function relies on. Checked against DSPy 3.4
(:data:`CHECKED_DSPY`, the pin in pyproject.toml).

What we read or set:

- :func:`engine_of`: the engine object a ``dspy.LM`` was built with (``dspy.LM(..., engine=...)``; kept on copies and
  deep copies). Read through the LM's public ``engine`` property; the attribute behind it is DSPy's ``_engine_spec``.
- :func:`caller_modules` / :func:`in_module_call`: the ``dspy.Module`` calls in progress in the calling context
  (the ``caller_modules`` key ``Module.__call__`` extends for the duration of each call).
- :func:`context_overrides`: the calling context's ``dspy.context`` overrides, to re-enter in a worker thread, as
  DSPy's own ``ParallelExecutor`` does (DSPy keeps them in ``dspy.dsp.utils.settings.thread_local_overrides``).
- :func:`mark_uncompiled`: clear the ``_compiled`` flag DSPy's teleprompters set on what they return.

What we change, and why: ``dspy.ReAct`` (and ProgramOfThought, RLM) shows a tool that raised to the LM as its
observation, ``"Execution error in <tool>: "`` plus a five-frame traceback (``dspy.utils.exceptions.format_error_for_lm``).
Each frame carries an absolute file name, so the same episode has a different prompt on every install
(``/work/main/.venv/lib/python3.11/site-packages/dspy/predict/react.py`` here, ``/tmp/ci/.venv/...`` in a fresh
clone): a rollout samples other tokens and an RL run trains another adapter depending on where Python lives.
Measured on the embedded agent model: the first GRPO step of the same seed generated 771 tokens in one checkout
and 776 in a fresh clone of the same commit; the held-out lift of the seed-0 RL test differed by 6 points.
:func:`format_error_for_lm` is DSPy's formatter with each frame's file name made relative to the ``sys.path``
entry it was imported from (``dspy/predict/react.py``): what the traceback tells the model stays, where Python
is installed goes. :func:`install` puts it in place of DSPy's in every module that imported it; importing
``rl`` installs it. The contract test fails by name when a DSPy module that uses the formatter is not patched or
the output differs from DSPy's in anything but the paths.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import dspy
from dspy.dsp.utils.settings import thread_local_overrides

CHECKED_DSPY = "3.4"  # the DSPy minor version this module was checked against
# Every DSPy module that imports format_error_for_lm by name (each holds its own reference to the function).
PATCHED_MODULES = ("dspy.utils.exceptions", "dspy.predict.react", "dspy.predict.react_v2",
                   "dspy.predict.program_of_thought", "dspy.predict.rlm")


def portable_path(filename: str) -> str:
    """``filename`` relative to the longest ``sys.path`` entry that contains it (unchanged when none does).

    Example:
        >>> import dspy.predict.react as react
        >>> portable_path(react.__file__)
        'dspy/predict/react.py'
    """
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if len(root) > len(best) and filename.startswith(root):
            best = root
    return filename[len(best):] if best else filename


def format_error_for_lm(error: BaseException, *, traceback_frames: int = 0) -> str:
    """DSPy's ``format_error_for_lm`` with portable file names (see the module docstring).

    ``traceback_frames <= 0`` gives ``str(error)``, as DSPy's does; otherwise a newline, then the traceback
    (chained exceptions included) limited to that many frames.
    """
    if traceback_frames <= 0:
        return str(error)
    # What traceback.format_exception builds (compact, chained); lookup_lines reads each frame's source line now,
    # while its file name still points at the file.
    summary = traceback.TracebackException(type(error), error, error.__traceback__, limit=traceback_frames,
                                           compact=True)
    seen: set[int] = set()
    pending = [summary]
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        for frame in te.stack:
            frame.filename = portable_path(frame.filename)
        pending += [t for t in (te.__cause__, te.__context__) if t is not None]
    return "\n" + "".join(summary.format()).strip()


def install() -> None:
    """Use :func:`format_error_for_lm` in every module of :data:`PATCHED_MODULES` (idempotent)."""
    for name in PATCHED_MODULES:
        importlib.import_module(name).format_error_for_lm = format_error_for_lm


# --- what we read of DSPy's context -------------------------------------------------------------------------------


def engine_of(lm: object) -> Any:
    """The engine object ``lm`` was built with (``dspy.LM(model, engine=...)``), or ``None``.

    ``None`` for anything that is not a ``dspy.LM``; a ``dspy.LM`` on one of DSPy's own engines gives its selection
    string (``"auto"``, ``"lm15"``, ``"litellm"``). Copies (``lm.copy()``) and deep copies of programs keep the engine
    object (ours return themselves from ``__deepcopy__``), so every LM handed out by a policy leads back to its engine.

    Example:
        >>> engine_of(dspy.LM("openai/gpt-4o-mini"))
        'auto'
    """
    return getattr(lm, "engine", None) if isinstance(lm, dspy.LM) else None


def caller_modules() -> tuple[Any, ...]:
    """The ``dspy.Module`` instances whose calls are in progress in the calling context, outermost first.

    Inside a module's ``forward`` (and in the LM calls it makes) the module itself is the last one; in a callback's
    ``on_module_start`` / ``on_module_end`` the module being started or ended is not on it (DSPy runs the callbacks
    outside the call), so there the tuple holds the modules that called it.

    Example:
        >>> caller_modules()
        ()
    """
    return tuple(dspy.settings.get("caller_modules") or ())


def in_module_call() -> bool:
    """Whether some ``dspy.Module`` call is in progress in the calling context (:func:`caller_modules` is not empty).

    In a callback's ``on_module_start`` / ``on_module_end``: whether that module was called by another module, i.e.
    the call is *not* a top-level program execution.
    """
    return bool(dspy.settings.get("caller_modules"))


def context_overrides() -> dict[str, Any]:
    """The ``dspy.context`` overrides of the calling context, as a new dict.

    A thread DSPy did not start sees DSPy's global settings only; ``with dspy.context(**context_overrides()):``
    taken in the parent and entered in the worker carries the parent's LM, callbacks, open recordings, ... into it,
    as DSPy's own ``ParallelExecutor`` (behind ``dspy.Evaluate`` and ``dspy.Parallel``) does.

    Example:
        >>> with dspy.context(cotune_doc_example=1):
        ...     context_overrides()["cotune_doc_example"]
        1
    """
    return dict(thread_local_overrides.get())


def mark_uncompiled(program: dspy.Module) -> None:
    """Clear the "compiled" flag DSPy's teleprompters set on the program they return.

    A program a teleprompter compiled (a ``p`` stage's result) is the next stage's student; DSPy's ``BootstrapFewShot``
    refuses a compiled student, and ``named_parameters`` of a module skips its compiled sub-modules. Only the top-level
    program is cleared, as ``dspy.Module.__init__`` sets it.
    """
    program._compiled = False
