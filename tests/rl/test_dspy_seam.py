"""Contract test of rl/dspy_seam.py against the installed DSPy: fails by name when DSPy changes what it patches."""

from __future__ import annotations

import inspect
import pathlib
import sys
import traceback

import dspy
from dspy.utils import DummyLM

import rl  # noqa: F401 - importing rl installs the seam
from rl import dspy_seam


def test_every_dspy_module_that_formats_errors_for_the_lm_is_patched():
    root = pathlib.Path(dspy.__file__).parent
    users = {".".join(("dspy", *path.relative_to(root).with_suffix("").parts)) for path in root.rglob("*.py")
             if "format_error_for_lm" in path.read_text()}
    assert users == set(dspy_seam.PATCHED_MODULES), "DSPy's users of format_error_for_lm changed: update PATCHED_MODULES"
    for name in users:
        assert sys.modules[name].format_error_for_lm is dspy_seam.format_error_for_lm, name
    assert dspy.__version__.startswith(dspy_seam.CHECKED_DSPY), (dspy.__version__, dspy_seam.CHECKED_DSPY)


def test_the_seam_prints_what_dspy_prints_but_the_install_folder():
    # DSPy's own formatter, as dspy/utils/exceptions.py writes it (the first assert fails when that changes)
    source = inspect.getsource(sys.modules["dspy.utils.exceptions"])
    assert "traceback.format_exception(type(error), error, error.__traceback__, limit=traceback_frames)" in source

    def convert(value, unit):
        return value * unit

    try:
        try:
            convert(1)  # a TypeError raised in this file, then a chained one
        except TypeError as inner:
            raise ValueError("bad arguments") from inner
    except ValueError as error:
        dspys = "\n" + "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=5)).strip()
        ours = dspy_seam.format_error_for_lm(error, traceback_frames=5)
        short = dspy_seam.format_error_for_lm(error)
    here = str(pathlib.Path(__file__).resolve())
    assert here in dspys and here not in ours and "tests/rl/test_dspy_seam.py" in ours
    assert dspys.replace(here, dspy_seam.portable_path(here)) == ours
    assert short == "bad arguments"  # no traceback asked for: str(error), as DSPy's


def test_react_shows_a_failed_tool_call_without_the_install_folder():
    def convert_units(value: float, from_unit: str, to_unit: str) -> str:
        """Convert value from one unit to another."""
        return str(value)

    lm = DummyLM([
        {"next_thought": "convert", "next_tool_name": "convert_units", "next_tool_args": {"value": 3}},
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "r", "answer": "3"},
    ])
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = dspy.ReAct("question -> answer", tools=[convert_units], max_iters=3)(question="3 m in ft?")
    observation = prediction.trajectory["observation_0"]
    assert observation.startswith("Execution error in convert_units: \nTraceback (most recent call last):")
    assert 'File "dspy/predict/react.py"' in observation and "missing 2 required positional arguments" in observation
    assert sys.prefix not in observation and str(pathlib.Path(dspy.__file__).parent) not in observation
