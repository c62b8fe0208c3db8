"""Contract test of rl/dspy_seam.py against the installed DSPy: fails by name when DSPy changes what it patches or
what a seam function reads (one test per function, named after it)."""

from __future__ import annotations

import copy
import inspect
import pathlib
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils import DummyLM
from dspy.utils.callback import BaseCallback

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


# --- what rl reads of DSPy's context ---------------------------------------------------------------------------------


class _Engine:
    """The smallest custom engine DSPy accepts (never called here); shared by deep copies, as ours are."""

    def complete(self, request):
        raise AssertionError("not called")

    def __deepcopy__(self, memo):
        return self


def test_engine_of_is_the_engine_object_the_lm_was_built_with():
    engine = _Engine()
    lm = dspy.LM("local/seam-test", engine=engine)
    why = "dspy.LM no longer keeps the engine object it was built with: update rl.dspy_seam.engine_of"
    assert dspy_seam.engine_of(lm) is engine, why
    assert lm._engine_spec is engine, why  # the attribute behind the public property
    assert dspy_seam.engine_of(lm.copy(temperature=0.5)) is engine, why
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    assert dspy_seam.engine_of(copy.deepcopy(program).lm) is engine, why
    assert dspy_seam.engine_of(dspy.LM("openai/gpt-4o-mini")) == "auto"  # one of DSPy's own engines
    assert dspy_seam.engine_of(DummyLM([])) is None and dspy_seam.engine_of(None) is None  # not a dspy.LM


class _Inner(dspy.Module):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self):
        self.seen["inner"] = (dspy_seam.caller_modules(), dspy_seam.in_module_call())
        return dspy.Prediction()


class _Outer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.seen = {}
        self.inner = _Inner(self.seen)

    def forward(self):
        self.seen["outer"] = (dspy_seam.caller_modules(), dspy_seam.in_module_call())
        return self.inner()


def test_caller_modules_are_the_module_calls_in_progress():
    outer = _Outer()
    outer()
    why = "DSPy's Module.__call__ no longer records the calls in progress: update rl.dspy_seam.caller_modules"
    assert outer.seen == {"outer": ((outer,), True), "inner": ((outer, outer.inner), True)}, why
    assert dspy_seam.caller_modules() == () and dspy_seam.in_module_call() is False, why


def test_in_module_call_in_a_callback_tells_a_nested_module_from_a_top_level_one():
    """What the budget and the prompt stage's run counter rely on: a top-level program call is not "in a module"."""
    events = []

    class Record(BaseCallback):
        def on_module_start(self, call_id, instance, inputs):
            events.append(("start", type(instance).__name__, dspy_seam.in_module_call()))

        def on_module_end(self, call_id, outputs, exception=None):
            events.append(("end", dspy_seam.in_module_call()))

    with dspy.context(callbacks=[Record()]):
        _Outer()()
    assert events == [("start", "_Outer", False), ("start", "_Inner", True), ("end", True), ("end", False)], (
        "DSPy runs module callbacks at another point of the call: update rl.dspy_seam.in_module_call")


def test_context_overrides_carry_the_dspy_context_into_a_worker_thread():
    def probe():
        return dspy.settings.get("cotune_seam_probe")

    def carried(overrides):
        with dspy.context(**overrides):
            return probe()

    with dspy.context(cotune_seam_probe=1), ThreadPoolExecutor(1) as pool:
        overrides = dspy_seam.context_overrides()
        bare, inside = pool.submit(probe).result(), pool.submit(carried, overrides).result()
    assert overrides["cotune_seam_probe"] == 1 and bare is None and inside == 1, (
        "DSPy keeps dspy.context overrides elsewhere: update rl.dspy_seam.context_overrides")
    overrides["cotune_seam_probe"] = 2  # a copy: changing it changes no context
    assert dspy_seam.context_overrides().get("cotune_seam_probe") is None
    # DSPy's own thread pool carries them the same way (rl.rollouts mirrors it)
    assert "thread_local_overrides.get().copy()" in inspect.getsource(sys.modules["dspy.utils.parallelizer"]), (
        "DSPy's ParallelExecutor no longer copies thread_local_overrides: re-check rl.dspy_seam.context_overrides")


def test_mark_uncompiled_makes_a_compiled_program_a_student_again():
    trainset = [dspy.Example(question="q", answer="a").with_inputs("question")]

    def bootstrap(student):
        return dspy.BootstrapFewShot(max_bootstrapped_demos=1, max_labeled_demos=0).compile(student, trainset=trainset)

    with dspy.context(lm=DummyLM([{"answer": "a"}] * 4)):
        compiled = bootstrap(dspy.Predict("question -> answer"))
        with pytest.raises(AssertionError, match="uncompiled"):  # DSPy refuses a compiled student...
            bootstrap(compiled)
        dspy_seam.mark_uncompiled(compiled)
        bootstrap(compiled)  # ...and takes it once the flag is cleared
    # named_parameters skips compiled sub-modules: clearing the flag makes them parameters again
    outer = _Outer()
    outer.inner.predict = dspy.Predict("question -> answer")
    outer.inner._compiled = True
    assert not outer.named_parameters(), "DSPy no longer skips compiled sub-modules: re-check mark_uncompiled"
    dspy_seam.mark_uncompiled(outer.inner)
    assert [name for name, _ in outer.named_parameters()] == ["inner.predict"], (
        "DSPy's compiled flag is no longer Module._compiled: update rl.dspy_seam.mark_uncompiled")
