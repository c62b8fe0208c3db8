"""The :class:`Rubric`: one weighted, gated set of named components that scores a DSPy prediction.

Why this module exists: cotune optimises prompts and LoRA weights against the *same* objective. A
rubric is that objective: ``rubric(example, pred, trace=None) -> Score(value, components, feedback)``.
Prompt optimisers get it through :meth:`Rubric.as_dspy_metric` / :meth:`Rubric.as_gepa_metric`, the
GRPO loop through :meth:`Rubric.reward`, and :func:`as_rubric` turns any plain DSPy metric into one.

Weights are a plain parameter (a dict or a list) so a tuner can set them; weight 0 makes a component
logged-only (as in the ``verifiers`` library). A gate zeroes a component unless another one passes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from metrics.adapters import DspyMetric, GepaMetric
from metrics.base import PicklableLock, Score, coerce_result, short_repr
from metrics.components import Custom
from metrics.errors import ComponentError, RubricConfigError

__all__ = ["Gate", "Rubric", "as_rubric"]

logger = logging.getLogger(__name__)

_EPS = 1e-9


class Gate:
    """Wrap a component so it counts 0 unless component ``requires`` scores at least ``threshold``.

    A gated component is not even called when its gate is closed (saving e.g. LM-judge calls), and the
    rubric's feedback says why it scored 0. The same can be written as ``Rubric(..., gates={...})``.

    Args:
        component: The gated component (or a plain metric callable).
        requires: Name of the gating component in the same rubric.
        threshold: Minimum value of ``requires`` for the gate to open, in ``[0, 1]``.

    Example:
        >>> from metrics import ExactMatch, FormatValidity
        >>> rubric = Rubric([Gate(ExactMatch("answer"), requires="format"), FormatValidity(["answer"])])
        >>> rubric.gates
        {'exact_match': ('format', 1.0)}
    """

    def __init__(self, component: Any, requires: str, threshold: float = 1.0) -> None:
        self.component = _as_component(component)
        self.name: str = self.component.name
        self.requires = requires
        self.threshold = float(threshold)

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Any:
        return self.component(example, prediction, trace)

    def __repr__(self) -> str:
        return f"Gate({self.component!r}, requires={self.requires!r}, threshold={self.threshold})"


def _as_component(obj: Any, name: str | None = None) -> Any:
    if isinstance(obj, Gate):
        return obj.component
    if callable(obj) and isinstance(getattr(obj, "name", None), str):
        return obj  # a component (or a nested Rubric); the rubric may still register it under another name
    if callable(obj):
        return Custom(obj, name=name)
    raise RubricConfigError(f"rubric components must be callables, got {type(obj).__name__}: {obj!r:.60}")


class Rubric(PicklableLock):
    """A weighted set of named components scoring ``(example, prediction, trace)`` in ``[0, 1]``.

    Args:
        components: Components (objects with a ``name``; see :mod:`metrics.components`), :class:`Gate`
            wrappers, or plain metric callables (named after the function). A mapping ``{name: callable}``
            names them explicitly. Names must be unique.
        weights: ``{name: weight}`` (missing names get 1.0) or a sequence aligned with ``components``;
            ``None`` weighs all components 1.0. Weights are >= 0; weight 0 = logged-only component.
        normalize: Divide by the sum of weights (default). With ``normalize=False`` the weights are used
            as given and must sum to at most 1, so the total stays in ``[0, 1]``.
        gates: ``{gated: requires}`` or ``{gated: (requires, threshold)}``; the default threshold is 1.0.
            A gated component counts 0 (and is not called) while ``requires`` is below the threshold;
            gates may chain (the requirement's own gated value is used).
        on_error: ``"raise"`` (default): a component that raises or returns NaN / a value outside
            ``[0, 1]`` raises :class:`~metrics.errors.ComponentError`. ``"zero"``: it scores 0, is counted
            in :attr:`error_counts` and reported in the feedback.
        name: Name of the rubric (used as the metric's ``__name__`` by the adapters).

    Example:
        >>> from metrics import ExactMatch, FormatValidity, LengthPenalty
        >>> rubric = Rubric(
        ...     [ExactMatch("answer", normalize=True), FormatValidity(["answer"]), LengthPenalty("answer", 20)],
        ...     weights={"exact_match": 3, "format": 1, "length": 0},
        ...     gates={"exact_match": "format"},
        ... )
        >>> score = rubric({"answer": "Paris"}, {"answer": "paris"})
        >>> score.value, score.components
        (1.0, {'exact_match': 1.0, 'format': 1.0, 'length': 1.0})
        >>> rubric({"answer": "Paris"}, {"answer": "Rome"}).value
        0.25
    """

    def __init__(
        self,
        components: Sequence[Any] | Mapping[str, Any],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        normalize: bool = True,
        gates: Mapping[str, str | tuple[str, float]] | None = None,
        on_error: Literal["raise", "zero"] = "raise",
        name: str = "rubric",
    ) -> None:
        if on_error not in ("raise", "zero"):
            raise RubricConfigError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        items = list(components.items()) if isinstance(components, Mapping) else [(None, c) for c in components]
        if not items:
            raise RubricConfigError("a Rubric needs at least one component")
        self._components: dict[str, Any] = {}
        gate_specs: dict[str, tuple[str, float]] = {}
        for key, obj in items:
            comp = _as_component(obj, key)
            comp_name = key or comp.name
            if comp_name in self._components:
                raise RubricConfigError(f"duplicate component name {comp_name!r}: pass name=... to one of them")
            self._components[comp_name] = comp
            if isinstance(obj, Gate):
                gate_specs[comp_name] = (obj.requires, obj.threshold)
        for gated, spec in (gates or {}).items():
            if gated in gate_specs:
                raise RubricConfigError(f"component {gated!r} is gated twice (Gate(...) and gates=); keep one")
            gate_specs[gated] = (spec, 1.0) if isinstance(spec, str) else (spec[0], float(spec[1]))
        self._weights = self._check_weights(weights)
        self.normalize = bool(normalize)
        self._effective = self._effective_weights()
        self._gates = gate_specs
        self._order = self._gate_order()
        self.on_error = on_error
        self.name = name
        self._error_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- construction checks
    def _check_weights(self, weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
        names = list(self._components)
        if weights is None:
            raw = dict.fromkeys(names, 1.0)
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise RubricConfigError(f"weights for unknown components {unknown}; components are {names}")
            raw = {n: float(weights.get(n, 1.0)) for n in names}
        else:
            weights = list(weights)
            if len(weights) != len(names):
                raise RubricConfigError(f"{len(weights)} weights for {len(names)} components {names}; "
                                        "pass one weight per component or a {name: weight} dict")
            raw = {n: float(w) for n, w in zip(names, weights, strict=True)}
        for n, w in raw.items():
            if not math.isfinite(w) or w < 0:
                raise RubricConfigError(f"weight of {n!r} is {w}; weights must be finite and >= 0 "
                                        "(express penalties as components that score 1 when good)")
        return raw

    def _effective_weights(self) -> dict[str, float]:
        total = sum(self._weights.values())
        if total <= 0:
            raise RubricConfigError("all weights are 0: give at least one component a weight > 0")
        if self.normalize:
            return {n: w / total for n, w in self._weights.items()}
        if total > 1 + _EPS:
            raise RubricConfigError(f"with normalize=False the weights must sum to <= 1, got {total:g}; "
                                    "rescale them or use normalize=True")
        return dict(self._weights)

    def _gate_order(self) -> list[str]:
        for gated, (requires, threshold) in self._gates.items():
            if gated not in self._components:
                raise RubricConfigError(f"gate on unknown component {gated!r}; components are {list(self._components)}")
            if requires not in self._components or requires == gated:
                raise RubricConfigError(f"component {gated!r} is gated by {requires!r}, which is not another "
                                        f"component of this rubric ({list(self._components)})")
            if not 0.0 <= threshold <= 1.0:
                raise RubricConfigError(f"gate threshold for {gated!r} must be in [0, 1], got {threshold}")
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(n: str) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise RubricConfigError(f"gates form a cycle through {n!r}; remove one of the gates")
            state[n] = 1
            if n in self._gates:
                visit(self._gates[n][0])
            state[n] = 2
            order.append(n)

        for n in self._components:
            visit(n)
        return order

    # ----------------------------------------------------------------- introspection
    @property
    def names(self) -> tuple[str, ...]:
        """Component names, in declaration order."""
        return tuple(self._components)

    @property
    def judges(self) -> tuple[str, ...]:
        """Names of the components that are LM judges (:class:`metrics.judge.LMJudge`), in declaration order:
        their scores are logged as ``LLM_JUDGE`` assessments, the rest as ``CODE``."""
        from metrics.judge import LMJudge

        return tuple(n for n, c in self._components.items() if isinstance(c, LMJudge))

    @property
    def components(self) -> dict[str, Any]:
        """``{name: component}`` (a copy)."""
        return dict(self._components)

    @property
    def weights(self) -> dict[str, float]:
        """The weights as given (before normalisation)."""
        return dict(self._weights)

    @property
    def effective_weights(self) -> dict[str, float]:
        """The weights actually applied (normalised when ``normalize=True``)."""
        return dict(self._effective)

    @property
    def gates(self) -> dict[str, tuple[str, float]]:
        """``{gated: (requires, threshold)}``."""
        return dict(self._gates)

    @property
    def error_counts(self) -> dict[str, int]:
        """How many times each component failed and was scored 0 (``on_error="zero"``), in this process."""
        with self._lock:
            return dict(self._error_counts)

    def reset_error_counts(self) -> None:
        """Forget the error counts."""
        with self._lock:
            self._error_counts.clear()

    def with_weights(self, weights: Mapping[str, float] | Sequence[float]) -> Rubric:
        """A copy of this rubric with other weights (same components, gates, normalisation, error policy).

        Example:
            >>> from metrics import ExactMatch, FormatValidity
            >>> r = Rubric([ExactMatch("answer"), FormatValidity(["answer"])])
            >>> r.with_weights({"format": 0}).effective_weights
            {'exact_match': 1.0, 'format': 0.0}
        """
        return Rubric(self._components, weights, normalize=self.normalize, gates=self._gates, on_error=self.on_error,
                      name=self.name)

    # ----------------------------------------------------------------- scoring
    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Score:
        """Score one prediction; see the class docstring."""
        values: dict[str, float] = {}
        notes: dict[str, tuple[str, str]] = {}  # name -> (status, text)
        for n in self._order:
            gate = self._gates.get(n)
            if gate is not None and values[gate[0]] < gate[1] - _EPS:
                values[n] = 0.0
                notes[n] = ("GATED", f"not scored: requires {gate[0]} >= {gate[1]:g}, got {values[gate[0]]:.2f}")
                continue
            values[n], notes[n] = self._score_one(n, example, prediction, trace)
        total = sum(self._weights[n] * values[n] for n in self._components)
        if self.normalize:  # divide once, so a perfect score is exactly 1.0 (not 0.9999999999999999)
            total /= sum(self._weights.values())
        ordered = {n: values[n] for n in self._components}
        return Score(min(1.0, max(0.0, total)), ordered, self._feedback(total, ordered, notes))

    def reward(self, example: Any, prediction: Any, trace: Any = None) -> Score:
        """Per-rollout reward for the weight stage: the same as calling the rubric (``score.value`` is the reward,
        ``score.components`` the values to log)."""
        return self(example, prediction, trace)

    def _score_one(self, n: str, example: Any, prediction: Any, trace: Any) -> tuple[float, tuple[str, str]]:
        try:
            result = coerce_result(self._components[n](example, prediction, trace))
        except Exception as e:  # noqa: BLE001 - any component failure is reported the same way
            return self._failed(n, example, f"raised {type(e).__name__}: {e}", e)
        v = result.value
        if not math.isfinite(v):
            return self._failed(n, example, f"returned {v!r}; values must be finite numbers in [0, 1]", None)
        if v < -_EPS or v > 1 + _EPS:
            return self._failed(n, example, f"returned {v!r}, outside [0, 1]", None)
        v = min(1.0, max(0.0, v))
        status = "PASS" if v >= 1.0 else ("FAIL" if v <= 0.0 else "PARTIAL")
        return v, (status, result.feedback)

    def _failed(self, n: str, example: Any, problem: str, cause: BaseException | None) -> tuple[float, tuple[str, str]]:
        if self.on_error == "raise":
            raise ComponentError(n, short_repr(example), problem) from cause
        with self._lock:
            first = n not in self._error_counts
            self._error_counts[n] = self._error_counts.get(n, 0) + 1
        (logger.warning if first else logger.debug)(
            "rubric %r: component %r %s on %s; scored 0 (on_error='zero')", self.name, n, problem, short_repr(example))
        return 0.0, ("ERROR", f"component error, scored 0: {problem}")

    def _feedback(self, total: float, values: dict[str, float], notes: dict[str, tuple[str, str]]) -> str:
        failed = [n for n in values if self._effective[n] > 0 and values[n] < 1.0]
        lines = [f"Total score {total:.2f}." + (f" Not passed: {', '.join(failed)}." if failed else " All passed.")]
        for n, v in values.items():
            status, text = notes[n]
            w = self._effective[n]
            weight = f"weight {w:.2f}" if w > 0 else "logged only"
            lines.append(f"- [{status}] {n} ({weight}): {v:.2f}" + (f" - {text}" if text else ""))
        return "\n".join(lines)

    # ----------------------------------------------------------------- adapters
    def as_dspy_metric(self, threshold: float = 1.0) -> DspyMetric:
        """This rubric as a DSPy metric: float when ``trace is None``, ``bool(value >= threshold)`` otherwise."""
        return DspyMetric(self, threshold)

    def as_gepa_metric(self) -> GepaMetric:
        """This rubric as GEPA's 5-argument metric returning ``dspy.Prediction(score=, feedback=)``."""
        return GepaMetric(self)

    # ----------------------------------------------------------------- pickling / repr
    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={self._weights[n]:g}" for n in self._components)
        return (f"Rubric({self.name!r}: {parts}, normalize={self.normalize}, gates={self._gates}, "
                f"on_error={self.on_error!r})")


def as_rubric(metric: Rubric | DspyMetric | GepaMetric | Callable[..., Any], *, name: str | None = None) -> Rubric:
    """Normalise "a Rubric or any DSPy metric callable" into a :class:`Rubric`.

    A rubric is returned unchanged; a rubric adapter returns its rubric; a component becomes a
    one-component rubric; any other callable ``(example, pred, trace=None)`` becomes a one-component rubric
    whose component is named after the function (or ``name``).

    Raises:
        RubricConfigError: If ``metric`` is not callable.

    Example:
        >>> def exact(example, pred, trace=None):
        ...     return example["answer"] == pred["answer"]
        >>> rubric = as_rubric(exact)
        >>> rubric.names, rubric({"answer": "4"}, {"answer": "4"}).value
        (('exact',), 1.0)
    """
    if isinstance(metric, Rubric):
        return metric
    if isinstance(metric, (DspyMetric, GepaMetric)):
        return metric.rubric
    if not callable(metric):
        raise RubricConfigError(f"expected a Rubric or a metric callable (example, pred, trace=None), "
                                f"got {type(metric).__name__}")
    component = _as_component(metric, name)
    return Rubric({name or component.name: component}, name=name or component.name)


