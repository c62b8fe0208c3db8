"""The task registry: a task is data + programs + rubric under one name that an experiment YAML can use.

Why a registry: ``cotune run`` and our tests need to say ``task: gsm`` (or ``{name: multihop, options: {k: 2}}``)
and get deterministic splits, a ready DSPy program and the rubric to optimise, without importing task modules
by hand. Built-in tasks are registered lazily (by module path), so importing the registry does not import
``reasoning_gym``, ``bm25s`` or ``datasets``; user code adds its own with :func:`register_task`.

Example:
    >>> from programs.registry import get_task, list_tasks
    >>> "last_digit" in list_tasks()
    True
    >>> task = get_task("last_digit")
    >>> train = task.load("train", 4, seed=0)
    >>> program = task.program()                 # the default program, a fresh dspy.Module
    >>> float(task.rubric()(train[0], {"answer": train[0].answer}))
    1.0
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy

from metrics import Rubric
from metrics.references import load_reference
from programs.tasks.splits import SPLITS, SplitError, check_split

__all__ = [
    "Task",
    "TaskError",
    "TaskOptionError",
    "UnknownProgramError",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "register_task",
    "task_from_spec",
]


class TaskError(ValueError):
    """Base class of the task layer's errors (bad names, options, data files, field mappings)."""


class UnknownTaskError(TaskError, KeyError):
    """No task is registered under this name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownProgramError(TaskError, KeyError):
    """The task has no program of this name; the message lists the task's programs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskOptionError(TaskError, TypeError):
    """An option the task's factory does not accept, or a bad value for one."""


Loader = Callable[[str, int, int], list[dspy.Example]]


@dataclass(frozen=True)
class Task:
    """One task: deterministic data with disjoint splits, DSPy programs for it, and its rubric.

    Attributes:
        name: Registered name (what an experiment YAML says).
        description: One line for ``cotune tasks`` listings and reports.
        loader: ``loader(split, n, seed) -> list[dspy.Example]``; use :meth:`load`, which validates first.
        programs: ``{program name: zero-argument factory returning a fresh dspy.Module}``.
        rubric_factory: Builds the task's :class:`metrics.Rubric` (a fresh one each call: rubrics count errors).
        default_program: Key of ``programs`` used when no program is named.
        gold_metric: A metric the optimizer never sees (for ``metrics.GoldGuard``); ``None`` when the rubric's
            correctness component is the whole story.
        options: The options the task was built with (logged as params).
    """

    name: str
    description: str
    loader: Loader
    programs: Mapping[str, Callable[[], dspy.Module]]
    rubric_factory: Callable[[], Rubric]
    default_program: str
    gold_metric: Callable[..., Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.programs:
            raise TaskError(f"task {self.name!r} has no programs")
        if self.default_program not in self.programs:
            raise TaskError(f"task {self.name!r}: default program {self.default_program!r} is not one of "
                            f"{sorted(self.programs)}")

    def load(self, split: str, n: int, seed: int = 0) -> list[dspy.Example]:
        """``n`` examples of ``split`` ("train", "val" or "test"), the same ones for the same seed.

        Raises:
            SplitError: unknown split, negative ``n``, or a split that holds fewer than ``n`` examples.
        """
        check_split(split)
        if not isinstance(n, int) or n < 0:
            raise SplitError(f"n must be an int >= 0, got {n!r}")
        return self.loader(split, n, seed)

    def splits(self, train: int, val: int, test: int = 0, seed: int = 0) -> dict[str, list[dspy.Example]]:
        """All three splits at once: ``{"train": [...], "val": [...], "test": [...]}``."""
        return {s: self.load(s, k, seed) for s, k in zip(SPLITS, (train, val, test))}

    def program(self, name: str | None = None) -> dspy.Module:
        """A fresh instance of the named program (default: :attr:`default_program`)."""
        name = name or self.default_program
        if name not in self.programs:
            raise UnknownProgramError(f"task {self.name!r} has no program {name!r}; its programs are "
                                      f"{sorted(self.programs)}")
        return self.programs[name]()

    def rubric(self) -> Rubric:
        """A fresh rubric for this task."""
        return self.rubric_factory()


TaskFactory = Callable[..., Task]

_REGISTRY: dict[str, TaskFactory | str] = {}
_LOCK = threading.Lock()

# Built-ins by "module:function" so that listing tasks imports nothing heavy.
_BUILTINS = {
    "last_digit": "programs.tasks.last_digit:task",
    "last_digit_long": "programs.tasks.last_digit:long_task",
    "rg_basic_arithmetic": "programs.tasks.rg:basic_arithmetic",
    "rg_chain_sum": "programs.tasks.rg:chain_sum",
    "rg_letter_counting": "programs.tasks.rg:letter_counting",
    "rg_spell_backward": "programs.tasks.rg:spell_backward",
    "gsm": "programs.tasks.gsm:task",
    "multihop": "programs.tasks.multihop:task",
    "react_tools": "programs.tasks.react_tools:task",
    "file": "programs.data:from_file",
    "gsm8k_file": "programs.data:gsm8k",
    "hotpotqa_file": "programs.data:hotpotqa",
}
_REGISTRY.update(_BUILTINS)


def register_task(name: str, factory: TaskFactory | Task, *, replace: bool = False) -> None:
    """Register ``factory(**options) -> Task`` (or a ready :class:`Task`) under ``name``.

    Raises:
        TaskError: ``name`` is taken (pass ``replace=True`` to override it) or is not a plain identifier.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise TaskError(f"task names are non-empty identifiers like 'my_task', got {name!r}")
    if isinstance(factory, Task):
        ready = factory
        factory = lambda: ready  # noqa: E731 - a constant factory
    if not callable(factory):
        raise TaskError(f"register_task({name!r}, ...) needs a Task or a callable returning one, "
                        f"got {type(factory).__name__}")
    with _LOCK:
        if name in _REGISTRY and not replace:
            raise TaskError(f"a task named {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    with _LOCK:
        return sorted(_REGISTRY)


def _resolve(name: str) -> TaskFactory:
    with _LOCK:
        entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownTaskError(f"unknown task {name!r}; registered tasks are: {', '.join(list_tasks())} "
                               f"(or register your own with programs.registry.register_task)")
    if isinstance(entry, str):
        return load_reference(entry)  # a built-in entry, written in our code: trusted
    return entry


def get_task(name: str, **options: Any) -> Task:
    """The task registered as ``name``, built with ``options`` (sizes, difficulty, file paths, ...).

    Raises:
        UnknownTaskError: no such task (the message lists the registered names).
        TaskOptionError: an option the task does not take (the message lists the ones it does).
    """
    factory = _resolve(name)
    try:
        bound = inspect.signature(factory).bind(**options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(factory).parameters if not p.startswith("_")]
        raise TaskOptionError(f"task {name!r} does not accept options {sorted(options)}: {exc}; "
                              f"its options are {accepted}") from exc
    task = factory(*bound.args, **bound.kwargs)
    if not isinstance(task, Task):
        raise TaskError(f"the factory registered as {name!r} returned a {type(task).__name__}, not a Task")
    return task


def task_from_spec(spec: str | Mapping[str, Any]) -> Task:
    """A task from its experiment-YAML form: ``"gsm"`` or ``{"name": "multihop", "options": {"k": 2}}``.

    Example:
        >>> task_from_spec({"name": "last_digit", "options": {"min_digits": 5}}).options["min_digits"]
        5
    """
    if isinstance(spec, str):
        return get_task(spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise TaskError(f"a task spec is a name or a mapping with 'name' (and optional 'options'), got {spec!r}")
    unknown = sorted(set(spec) - {"name", "options"})
    if unknown:
        raise TaskError(f"unknown keys {unknown} in task spec for {spec['name']!r}; allowed: name, options")
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise TaskError(f"options of task {spec['name']!r} must be a mapping, got {type(options).__name__}")
    return get_task(str(spec["name"]), **dict(options))
