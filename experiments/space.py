"""Search spaces of ``cotune tune``: one ``tune.space`` entry -> a :class:`Param`, and the error a bad one raises.

Why a module of its own: the experiment-file validator (:mod:`experiments.config`) checks a ``tune:`` section with
:func:`parse_param`, and the tuning worker (:mod:`experiments.tuning`) builds its study from the same parse. Both
import this leaf, which imports nothing of ours and not Optuna (a trial is only used through its ``suggest_*``
methods), so the validator needs neither the tuner nor the runner, and the imports of ``experiments/`` point one way.

Example:
    >>> parse_param("weights.learning_rate", {"low": "1e-4", "high": 1e-2, "log": True})
    Param(name='weights.learning_rate', kind='float', choices=None, low=0.0001, high=0.01, log=True, step=None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "TuneError", "parse_param", "parse_space"]


class TuneError(ValueError):
    """A bad search space, sampler, pruner or storage (the message names the parameter and the fix)."""


# --- search spaces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched setting: categorical ``choices``, or a ``low``..``high`` range of ints or floats."""

    name: str
    kind: str  # "categorical", "int" or "float"
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices or ()))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool):
        raise TuneError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            raise TuneError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TuneError(f"{what} must be a finite number, got {value!r}")
    return value


def parse_param(name: str, spec: Any, kind_hint: str | None = None) -> Param:
    """A :class:`Param` from its experiment-file form.

    ``{choices: [a, b]}`` is categorical; ``{low: L, high: H}`` (with optional ``log: true``, ``step: S`` and
    ``type: int|float``) is a range, of ints when ``type: int``, when ``kind_hint`` is ``"int"``, or when both
    bounds are integers and nothing says float.

    Raises:
        TuneError: unknown keys, both or neither of choices and a range, low > high, log with low <= 0.
    """
    if not isinstance(spec, Mapping):
        raise TuneError(f"{name}: a parameter is {{choices: [...]}} or {{low: L, high: H, log: false}}, got {spec!r}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step", "type"}
    if unknown:
        raise TuneError(f"{name}: unknown key(s) {sorted(unknown)}; use choices, or low/high/log/step/type")
    if "choices" in spec:
        if set(spec) - {"choices", "type"}:
            raise TuneError(f"{name}: give either choices or a low/high range, not both")
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise TuneError(f"{name}: choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise TuneError(f"{name}: choices must be numbers, strings, booleans or null, got {c!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise TuneError(f"{name}: choices must be distinct, got {list(choices)}")
        return Param(name, "categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise TuneError(f"{name}: needs choices: [...] or both low and high")
    low, high = _number(spec["low"], f"{name}.low"), _number(spec["high"], f"{name}.high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{name}: log must be true or false, got {log!r}")
    step = _number(spec["step"], f"{name}.step") if spec.get("step") is not None else None
    kind = spec.get("type") or kind_hint or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise TuneError(f"{name}: type must be 'int' or 'float', got {kind!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise TuneError(f"{name}: an int range needs integer bounds, got {low}..{high}")
    if low > high:
        raise TuneError(f"{name}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise TuneError(f"{name}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise TuneError(f"{name}: Optuna cannot combine log: true with a step")
    if step is not None and step <= 0:
        raise TuneError(f"{name}: step must be > 0, got {step}")
    if kind == "int":
        return Param(name, "int", low=int(low), high=int(high), log=log, step=int(step) if step else None)
    return Param(name, "float", low=float(low), high=float(high), log=log, step=float(step) if step else None)


def parse_space(space: Mapping[str, Any], kind_hints: Mapping[str, str] | None = None) -> dict[str, Param]:
    """``{name: spec}`` -> ``{name: Param}`` (see :func:`parse_param`)."""
    if not isinstance(space, Mapping) or not space:
        raise TuneError("the search space is empty; give at least one parameter")
    hints = kind_hints or {}
    return {name: parse_param(name, spec, hints.get(name)) for name, spec in space.items()}
