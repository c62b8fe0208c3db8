"""Built-in rubric components: match, numeric match, format validity, answer type, length, regex, custom.

Why this module exists: most tasks need the same handful of checks. Each one is a small picklable
class with a ``name`` and ``__call__(example, prediction, trace=None) -> ComponentResult``, so a rubric
built from them runs in threads, process pools and DSPy optimizers alike. The LM judge lives in
:mod:`metrics.judge`.

Missing fields never raise: a prediction without the scored field scores 0 with feedback saying so
(see :data:`~metrics.base.ERROR_KEY` for failed program runs). A *gold* field missing from the example
is a dataset bug and raises ``KeyError`` (the rubric turns it into a ``ComponentError``).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from metrics.base import ERROR_KEY, MISSING, ComponentResult, coerce_result, get_field, truncate
from metrics.errors import RubricConfigError
from metrics.parsing import normalize_text, parse_number, validate_json_schema

__all__ = [
    "AnswerType",
    "Contains",
    "Custom",
    "ExactMatch",
    "FormatValidity",
    "LengthPenalty",
    "NumericMatch",
    "Regex",
]


def _missing(field: str, prediction: Any) -> ComponentResult:
    error = get_field(prediction, ERROR_KEY, None)
    why = f" (program failed: {error})" if error else ""
    return ComponentResult(0.0, f"prediction has no field {field!r}{why}")


def _gold(example: Any, field: str, component: str) -> Any:
    value = get_field(example, field)
    if value is MISSING:
        raise KeyError(f"example has no gold field {field!r}; pass gold_field= to {component}")
    return value


class _Base:
    """Shared repr for the built-ins (their state is plain attributes, so they pickle as-is)."""

    name: str

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ExactMatch(_Base):
    """1.0 when the predicted field equals the gold field, else 0.0.

    Without ``normalize`` values are compared as stripped strings; with ``normalize=True`` both sides go
    through :func:`~metrics.parsing.normalize_text` (casefold, no punctuation/articles, collapsed
    whitespace, as in SQuAD). A gold value that is a list/tuple/set means "any of these".

    Args:
        field: Output field of the prediction.
        gold_field: Field of the example holding the gold answer (default: ``field``).
        normalize: Apply SQuAD-style normalisation first.
        name: Component name in the rubric.

    Example:
        >>> ExactMatch("answer", normalize=True)({"answer": "Paris"}, {"answer": "the paris."}).value
        1.0
    """

    def __init__(self, field: str = "answer", gold_field: str | None = None, normalize: bool = False,
                 name: str = "exact_match") -> None:
        self.field = field
        self.gold_field = gold_field or field
        self.normalize = normalize
        self.name = name

    def _norm(self, value: Any) -> str:
        return normalize_text(value) if self.normalize else str(value).strip()

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        gold = _gold(example, self.gold_field, "ExactMatch")
        got = get_field(prediction, self.field)
        if got is MISSING or got is None:
            return _missing(self.field, prediction)
        golds = list(gold) if isinstance(gold, (list, tuple, set, frozenset)) else [gold]
        if self._norm(got) in {self._norm(g) for g in golds}:
            return ComponentResult(1.0)
        want = truncate(golds[0]) if len(golds) == 1 else f"one of {[str(g) for g in golds]!r:.80}"
        return ComponentResult(0.0, f"expected {want}, got {truncate(got)}")


class NumericMatch(_Base):
    """1.0 when the number parsed from the predicted field is close to the gold number, else 0.0.

    Numbers are parsed with :func:`~metrics.parsing.parse_number` (the *last* number in the text;
    "1,234", "$5.50", "-3", "1e3", "3/4" all work). An unparseable prediction scores 0 with feedback.
    Closeness is ``math.isclose(got, gold, rel_tol=rel_tol, abs_tol=abs_tol)``.

    Example:
        >>> NumericMatch("answer")({"answer": "1234"}, {"answer": "The total is $1,234."}).value
        1.0
        >>> NumericMatch("answer", rel_tol=0.1)({"answer": 100}, {"answer": "95"}).value
        1.0
    """

    def __init__(self, field: str = "answer", gold_field: str | None = None, rel_tol: float = 1e-9,
                 abs_tol: float = 1e-9, name: str = "numeric_match") -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise RubricConfigError(f"NumericMatch tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
        self.field = field
        self.gold_field = gold_field or field
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.name = name

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        raw_gold = _gold(example, self.gold_field, "NumericMatch")
        gold = parse_number(raw_gold)
        if gold is None:
            raise ValueError(f"gold field {self.gold_field!r} holds no number: {raw_gold!r:.80}")
        got_raw = get_field(prediction, self.field)
        if got_raw is MISSING or got_raw is None:
            return _missing(self.field, prediction)
        got = parse_number(got_raw)
        if got is None:
            return ComponentResult(0.0, f"could not parse a number from {truncate(got_raw)}; expected {gold:g}")
        if math.isclose(got, gold, rel_tol=self.rel_tol, abs_tol=self.abs_tol):
            return ComponentResult(1.0)
        return ComponentResult(0.0, f"expected {gold:g}, got {got:g} (parsed from {truncate(got_raw)})")


class FormatValidity(_Base):
    """Did the adapter parse every output field? Partial credit = fraction of fields present and non-empty.

    A field counts when the prediction has it and it is not ``None`` or a blank string. A prediction
    carrying :data:`~metrics.base.ERROR_KEY` (a failed run) is scored the same way on whatever fields the
    rollout code could fill, and its error string goes into the feedback.

    Args:
        fields: Expected output fields. ``None`` uses the example's label fields
            (``example.labels()`` of a ``dspy.Example`` built with ``with_inputs``).
        name: Component name in the rubric.

    Example:
        >>> FormatValidity(["reasoning", "answer"])({}, {"answer": "4", "reasoning": " "}).value
        0.5
    """

    def __init__(self, fields: Sequence[str] | None = None, name: str = "format") -> None:
        if isinstance(fields, str):
            fields = [fields]
        if fields is not None and not fields:
            raise RubricConfigError("FormatValidity needs at least one field (or fields=None to use the labels)")
        self.fields = None if fields is None else list(fields)
        self.name = name

    def _expected(self, example: Any) -> list[str]:
        if self.fields is not None:
            return self.fields
        labels = getattr(example, "labels", None)
        keys = list(labels().keys()) if callable(labels) else []
        if not keys:
            raise ValueError("FormatValidity(fields=None) needs a dspy.Example with inputs marked "
                             "(example.with_inputs(...)); or pass fields=[...]")
        return keys

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        fields = self._expected(example)
        missing = []
        for f in fields:
            value = get_field(prediction, f)
            if value is MISSING or value is None or (isinstance(value, str) and not value.strip()):
                missing.append(f)
        value = (len(fields) - len(missing)) / len(fields)
        notes = []
        if missing:
            notes.append(f"missing or empty output fields: {', '.join(missing)} ({len(fields) - len(missing)} "
                         f"of {len(fields)} parsed)")
        error = get_field(prediction, ERROR_KEY, None)
        if error:
            notes.append(f"program failed: {error}")
        return ComponentResult(value, "; ".join(notes))


class AnswerType(_Base):
    """1.0 when the predicted field has the expected type: ``int``, ``float``, ``choice`` or ``json``.

    * ``int``: an integer literal (thousands separators allowed) or an ``int`` value.
    * ``float``: anything ``float()`` accepts except NaN/inf.
    * ``choice``: one of ``choices``, compared casefolded and stripped.
    * ``json``: parses as JSON (a ``dict``/``list`` value is taken as parsed) and, when ``schema`` is given,
      validates against it: with ``jsonschema`` when importable, else with the subset in
      :func:`~metrics.parsing.validate_json_schema` (type/properties/required/items/enum).

    Example:
        >>> AnswerType("answer", "choice", choices=["yes", "no"])({}, {"answer": " Yes"}).value
        1.0
        >>> AnswerType("answer", "json", schema={"type": "object", "required": ["a"]})({}, {"answer": "{}"}).value
        0.0
    """

    _INT = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")

    def __init__(self, field: str = "answer", kind: Literal["int", "float", "choice", "json"] = "int",
                 choices: Sequence[str] | None = None, schema: Mapping[str, Any] | None = None,
                 name: str = "answer_type") -> None:
        if kind not in ("int", "float", "choice", "json"):
            raise RubricConfigError(f"AnswerType kind must be 'int', 'float', 'choice' or 'json', got {kind!r}")
        if kind == "choice" and not choices:
            raise RubricConfigError("AnswerType(kind='choice') needs choices=[...]")
        if schema is not None and kind != "json":
            raise RubricConfigError("AnswerType(schema=...) only applies to kind='json'")
        self.field = field
        self.kind = kind
        self.choices = None if choices is None else [str(c) for c in choices]
        self.schema = None if schema is None else dict(schema)
        self.name = name

    def _check(self, value: Any) -> str:
        """Return '' when ``value`` has the right type, else the reason it does not."""
        text = value.strip() if isinstance(value, str) else value
        if self.kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return ""
            ok = isinstance(text, str) and self._INT.fullmatch(text)
            return "" if ok else f"expected an int, got {truncate(value)}"
        if self.kind == "float":
            try:
                number = float(text.replace(",", "") if isinstance(text, str) else text)
            except (TypeError, ValueError):
                return f"expected a number, got {truncate(value)}"
            ok = math.isfinite(number) and not isinstance(value, bool)
            return "" if ok else f"expected a finite number, got {value!r}"
        if self.kind == "choice":
            allowed = {c.strip().casefold() for c in self.choices or ()}
            return "" if str(text).casefold() in allowed else f"expected one of {self.choices!r}, got {truncate(value)}"
        if isinstance(value, (dict, list)):
            data = value
        else:
            try:
                data = json.loads(str(text))
            except ValueError as e:
                return f"invalid JSON ({e}): {truncate(value)}"
        if self.schema is None:
            return ""
        problems = _schema_problems(data, self.schema)
        return "" if not problems else "invalid JSON for the schema: " + "; ".join(problems[:3])

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        value = get_field(prediction, self.field)
        if value is MISSING or value is None:
            return _missing(self.field, prediction)
        problem = self._check(value)
        return ComponentResult(0.0 if problem else 1.0, problem)


def _schema_problems(data: Any, schema: Mapping[str, Any]) -> list[str]:
    try:
        import jsonschema  # optional dependency
    except ImportError:
        return validate_json_schema(data, schema)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"$.{'.'.join(str(p) for p in e.path)}: {e.message}".replace("$.:", "$:") for e in
            validator.iter_errors(data)]


class LengthPenalty(_Base):
    """1.0 while the field's length is inside ``[min_len, max_len]``, decaying linearly to 0 outside.

    The score falls to 0 over ``width`` units past either bound. With ``width=None`` the width is the
    bound itself (so ``2 * max_len`` and length 0 score 0). Length is counted in characters
    (``unit="chars"``) or whitespace-separated words (``unit="words"``). A missing field has length 0.

    Args:
        field: Output field to measure.
        max_len: Upper bound of the target range (``None``: no upper bound).
        min_len: Lower bound of the target range.
        unit: ``"chars"`` or ``"words"``.
        width: Decay width in ``unit``s, > 0.
        name: Component name in the rubric.

    Example:
        >>> pen = LengthPenalty("answer", max_len=10, width=10)
        >>> [pen({}, {"answer": "x" * n}).value for n in (10, 15, 20, 30)]
        [1.0, 0.5, 0.0, 0.0]
    """

    def __init__(self, field: str = "answer", max_len: int | None = None, min_len: int = 0, *,
                 unit: Literal["chars", "words"] = "chars", width: float | None = None,
                 name: str = "length") -> None:
        if unit not in ("chars", "words"):
            raise RubricConfigError(f"LengthPenalty unit must be 'chars' or 'words', got {unit!r}")
        if min_len < 0 or (max_len is not None and max_len < min_len):
            raise RubricConfigError(f"LengthPenalty needs 0 <= min_len <= max_len, got min_len={min_len}, "
                                    f"max_len={max_len}")
        if width is not None and width <= 0:
            raise RubricConfigError(f"LengthPenalty width must be > 0, got {width}")
        self.field = field
        self.max_len = max_len
        self.min_len = min_len
        self.unit = unit
        self.width = width
        self.name = name

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        value = get_field(prediction, self.field)
        text = "" if value is MISSING or value is None else str(value)
        n = len(text.split()) if self.unit == "words" else len(text)
        if self.max_len is not None and n > self.max_len:
            width = self.width or max(self.max_len, 1)
            score = max(0.0, 1.0 - (n - self.max_len) / width)
            return ComponentResult(score, f"{n} {self.unit}, above the maximum of {self.max_len}")
        if n < self.min_len:
            width = self.width or self.min_len
            score = max(0.0, 1.0 - (self.min_len - n) / width)
            return ComponentResult(score, f"{n} {self.unit}, below the minimum of {self.min_len}")
        return ComponentResult(1.0)


class Regex(_Base):
    """1.0 when ``pattern`` matches the field (``re.search`` by default, or ``fullmatch=True``).

    Example:
        >>> Regex("answer", r"^\\d+$")({}, {"answer": "42"}).value
        1.0
    """

    def __init__(self, field: str, pattern: str, *, flags: int = 0, fullmatch: bool = False,
                 name: str = "regex") -> None:
        try:
            self._compiled = re.compile(pattern, flags)
        except re.error as e:
            raise RubricConfigError(f"Regex pattern {pattern!r} does not compile: {e}") from e
        self.field = field
        self.pattern = pattern
        self.flags = flags
        self.fullmatch = fullmatch
        self.name = name

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        value = get_field(prediction, self.field)
        if value is MISSING or value is None:
            return _missing(self.field, prediction)
        match = (self._compiled.fullmatch if self.fullmatch else self._compiled.search)(str(value))
        return ComponentResult(1.0) if match else ComponentResult(
            0.0, f"{truncate(value)} does not match /{self.pattern}/")


class Contains(_Base):
    """1.0 when the field contains ``text`` (or the example's ``gold_field`` value), else 0.0.

    Args:
        field: Output field to search in.
        text: Fixed substring to look for; or ``None`` with ``gold_field`` set.
        gold_field: Example field whose value must appear in the prediction (e.g. the answer in a long reply).
        case_sensitive: Compare as-is (default) or casefolded.
        name: Component name in the rubric.

    Example:
        >>> Contains("answer", "paris", case_sensitive=False)({}, {"answer": "It is Paris."}).value
        1.0
    """

    def __init__(self, field: str, text: str | None = None, *, gold_field: str | None = None,
                 case_sensitive: bool = True, name: str = "contains") -> None:
        if (text is None) == (gold_field is None):
            raise RubricConfigError("Contains needs exactly one of text= or gold_field=")
        self.field = field
        self.text = text
        self.gold_field = gold_field
        self.case_sensitive = case_sensitive
        self.name = name

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        needle = self.text if self.gold_field is None else str(_gold(example, self.gold_field, "Contains"))
        value = get_field(prediction, self.field)
        if value is MISSING or value is None:
            return _missing(self.field, prediction)
        hay, want = str(value), str(needle)
        if not self.case_sensitive:
            hay, want = hay.casefold(), want.casefold()
        return ComponentResult(1.0) if want in hay else ComponentResult(
            0.0, f"expected {truncate(needle)} in {truncate(value)}")


class Custom(_Base):
    """Wrap any DSPy-style metric ``fn(example, pred, trace=None)`` as a component.

    ``fn`` may return a bool, a float, a ``(float, feedback)`` tuple, a ``ComponentResult``, a
    :class:`~metrics.base.Score` or a ``dspy.Prediction(score=..., feedback=...)``. A two-argument
    ``fn(example, pred)`` works too. The component is picklable when ``fn`` is (a module-level function).

    Args:
        fn: The metric callable.
        name: Component name (default: the function's ``__name__``; ``"custom"`` for lambdas).

    Example:
        >>> def short(example, pred, trace=None):
        ...     return len(pred["answer"]) < 5
        >>> Custom(short).name, Custom(short)({}, {"answer": "ok"}).value
        ('short', 1.0)
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        if not callable(fn):
            raise RubricConfigError(f"Custom needs a callable, got {type(fn).__name__}")
        self.fn = fn
        fn_name = getattr(fn, "__name__", None) or type(fn).__name__
        self.name = name or ("custom" if fn_name == "<lambda>" else fn_name)
        self._takes_trace = _accepts_n_args(fn, 3)

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        raw = self.fn(example, prediction, trace) if self._takes_trace else self.fn(example, prediction)
        return coerce_result(raw)


def _accepts_n_args(fn: Callable[..., Any], n: int) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True
