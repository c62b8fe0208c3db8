"""The small shared vocabulary of :mod:`metrics`: results, scores, the component protocol, field access.

Why this module exists: components, the rubric, the LM judge and the guards all need the same few
types and helpers; keeping them here lets every other module import downward only.

Conventions documented here (other packages rely on them):

* A component is any object with a ``name`` and ``__call__(example, prediction, trace=None)`` returning
  a float in ``[0, 1]``, a ``(float, feedback)`` tuple, or a :class:`ComponentResult`.
* :data:`ERROR_KEY`: a prediction produced for a *failed* program run (adapter parse error, exception in
  a module, timeout) carries the key ``"cotune_error"`` holding a short error string. The rollout code
  (``rl/``, ``optimizers/``) sets it and may also fill whatever output fields it could partially parse.
  :class:`~metrics.components.FormatValidity` scores such predictions by the fields present and reports
  the error in its feedback; other components simply see missing fields.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ERROR_KEY",
    "MISSING",
    "Component",
    "ComponentResult",
    "GuardEvent",
    "Score",
    "coerce_result",
    "get_field",
    "input_items",
    "short_repr",
]

ERROR_KEY = "cotune_error"
"""Key set on a prediction whose program run failed; its value is a short error string."""


class PicklableLock:
    """Mixin for objects that guard counters with ``self._lock``: pickling drops the lock, unpickling makes a new one.

    Why: rubrics and judges must cross process boundaries (multi-process evaluation) but a lock cannot.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _Missing:
    """Sentinel for "field not present" (distinct from a present ``None``)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self):
        return (_Missing, ())


MISSING: Any = _Missing()


@dataclass(frozen=True)
class ComponentResult:
    """A component's value plus optional text feedback.

    Example:
        >>> ComponentResult(0.5, "1 of 2 fields parsed")
        ComponentResult(value=0.5, feedback='1 of 2 fields parsed')
    """

    value: float
    feedback: str = ""


@dataclass(frozen=True)
class Score:
    """What a :class:`~metrics.rubric.Rubric` returns for one (example, prediction).

    Attributes:
        value: Weighted total in ``[0, 1]``.
        components: Every component's value by name, including weight-0 (logged-only) components.
        feedback: Combined, human-readable feedback of the components (what GEPA reads).

    Example:
        >>> s = Score(0.75, {"correct": 1.0, "format": 0.5}, "format: 1 of 2 fields")
        >>> float(s), s.components["format"]
        (0.75, 0.5)
    """

    value: float
    components: dict[str, float] = field(default_factory=dict)
    feedback: str = ""

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class GuardEvent:
    """Something a guard (:mod:`metrics.guards`) noticed.

    Here, not in :mod:`metrics.guards`, because :class:`~metrics.errors.RewardHackingError` carries one and the
    guards raise that error: both import it downward from this leaf.

    Attributes:
        kind: What was seen, e.g. ``"gold_divergence"``, ``"repetition"``, ``"length"``, ``"length_growth"``,
            ``"one_component_rise"``, ``"canary_moved"``.
        step: The stage name or step number it was seen at.
        message: One human-readable sentence.
        data: The numbers behind it (for logging).
    """

    kind: str
    step: int | str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Component(Protocol):
    """Protocol of a rubric component: a named callable scoring one prediction in ``[0, 1]``."""

    name: str

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> float | tuple[float, str] | ComponentResult:
        ...


def coerce_result(raw: Any) -> ComponentResult:
    """Turn whatever a component or DSPy metric returned into a :class:`ComponentResult`.

    Accepted: ``bool`` (1.0/0.0), ``int``/``float``, ``(value, feedback)`` tuples, :class:`ComponentResult`,
    :class:`Score`, and objects with a ``score`` attribute (``dspy.Prediction(score=..., feedback=...)``).
    The value is *not* range-checked here; the rubric does that so it can name the component.

    Raises:
        TypeError: For any other return type.

    Example:
        >>> coerce_result(True), coerce_result((0.5, "half"))
        (ComponentResult(value=1.0, feedback=''), ComponentResult(value=0.5, feedback='half'))
    """
    if isinstance(raw, ComponentResult):
        return raw
    if isinstance(raw, Score):
        return ComponentResult(float(raw.value), raw.feedback)
    if isinstance(raw, bool):
        return ComponentResult(1.0 if raw else 0.0)
    if isinstance(raw, (int, float)):
        return ComponentResult(float(raw))
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], (str, type(None))):
        return ComponentResult(coerce_result(raw[0]).value, raw[1] or "")
    score = get_field(raw, "score")
    if score is not MISSING and score is not None and not isinstance(raw, str):
        feedback = get_field(raw, "feedback")
        return ComponentResult(coerce_result(score).value, "" if feedback in (MISSING, None) else str(feedback))
    if hasattr(raw, "__float__") and not isinstance(raw, str):
        return ComponentResult(float(raw))  # numpy scalars and similar
    raise TypeError(
        f"expected a bool, a float, a (float, feedback) tuple, a ComponentResult or an object with .score; "
        f"got {type(raw).__name__}: {raw!r:.80}"
    )


def get_field(obj: Any, name: str, default: Any = MISSING) -> Any:
    """Read field ``name`` from a ``dspy.Example``/``dspy.Prediction``, a mapping, or any object.

    Returns ``default`` (:data:`MISSING` unless given) when the field is absent.

    Example:
        >>> get_field({"answer": "4"}, "answer"), get_field({}, "answer", None)
        ('4', None)
    """
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    getter = getattr(obj, "get", None)
    if callable(getter) and hasattr(obj, "keys"):  # dspy.Example / dspy.Prediction
        try:
            return getter(name, default)
        except Exception:  # noqa: BLE001 - fall back to attribute access below
            pass
    return getattr(obj, name, default)


def input_items(obj: Any) -> dict[str, Any]:
    """The input fields of an example as a dict: ``example.inputs()`` for a ``dspy.Example`` with marked
    inputs, else every field (a mapping's items; ``{"value": obj}`` for anything else)."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    inputs = getattr(obj, "inputs", None)
    if callable(inputs):
        try:
            return dict(inputs().items())
        except Exception:  # noqa: BLE001 - dspy.Example without with_inputs(): show everything
            pass
    if hasattr(obj, "items") and callable(obj.items):
        try:
            return dict(obj.items())
        except Exception:  # noqa: BLE001
            pass
    return {"value": obj}


def short_repr(example: Any, limit: int = 120) -> str:
    """A one-line repr of an example's inputs (all fields if inputs were not marked), cut at ``limit`` chars.

    Example:
        >>> short_repr({"question": "What is 2+2?"})
        "{question='What is 2+2?'}"
    """
    parts = []
    for key, value in input_items(example).items():
        text = repr(value)
        if len(text) > 40:
            text = text[:37] + "..."
        parts.append(f"{key}={text}")
    out = "{" + ", ".join(parts) + "}"
    return out if len(out) <= limit else out[: limit - 4] + "...}"


def truncate(text: Any, limit: int = 80) -> str:
    """``repr``-like, length-limited rendering of a value for feedback messages."""
    s = str(text)
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")
