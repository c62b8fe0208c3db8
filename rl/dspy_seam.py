"""The one DSPy internal cotune changes: tool-error tracebacks shown to the LM name no install folder.

Why: ``dspy.ReAct`` (and ProgramOfThought, RLM) shows a tool that raised to the LM as its observation,
``"Execution error in <tool>: "`` plus a five-frame traceback (``dspy.utils.exceptions.format_error_for_lm``).
Each frame carries an absolute file name, so the same episode has a different prompt on every install
(``/work/main/.venv/lib/python3.11/site-packages/dspy/predict/react.py`` here, ``/tmp/ci/.venv/...`` in a fresh
clone): a rollout samples other tokens and an RL run trains another adapter depending on where Python lives.
Measured on the embedded agent model: the first GRPO step of the same seed generated 771 tokens in one checkout
and 776 in a fresh clone of the same commit; the held-out lift of the seed-0 RL test differed by 6 points.

:func:`format_error_for_lm` is DSPy's formatter with each frame's file name made relative to the ``sys.path``
entry it was imported from (``dspy/predict/react.py``): what the traceback tells the model stays, where Python
is installed goes. :func:`install` puts it in place of DSPy's in every module that imported it; importing
``rl`` installs it. Checked against DSPy 3.4 (:data:`CHECKED_DSPY`, the pin in pyproject.toml);
``tests/rl/test_dspy_seam.py`` fails by name when a DSPy module that uses the formatter is not patched or the
output differs from DSPy's in anything but the paths.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

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
