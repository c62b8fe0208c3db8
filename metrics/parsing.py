"""Text helpers behind the built-in components: SQuAD-style normalisation, number parsing, JSON-schema checks.

Why this module exists: these are the parts of a metric that are easy to get subtly wrong ("1,234",
"$5.50", "The Answer."), so they live in one place with their own tests, free of any DSPy types.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["normalize_text", "parse_number", "validate_json_schema"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = str.maketrans("", "", string.punctuation)

# sign, optional currency, digits (with optional thousands separators) or a bare fraction part,
# optional decimals, optional exponent, optional "/denominator".
_SCALAR = (
    r"(?<![\w.])"
    r"(?P<sign>[-+\u2212])?\s?[$\u20ac\u00a3\u00a5]?\s?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?"
)
_NUMBER = re.compile(_SCALAR + r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?(?![\d])")
_NUMBER_NO_FRACTION = re.compile(_SCALAR + r"(?![\d])")


def normalize_text(text: Any) -> str:
    """SQuAD-style normalisation: casefold, drop punctuation and the articles a/an/the, collapse whitespace.

    Example:
        >>> normalize_text("  The  Eiffel-Tower! ")
        'eiffeltower'
        >>> normalize_text("An apple a day")
        'apple day'
    """
    s = str(text).casefold().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def parse_number(text: Any, which: Literal["first", "last"] = "last", fractions: bool = True) -> float | None:
    """Parse a number out of free text; ``None`` when there is none.

    Understands signs, thousands separators, currency symbols, decimals, exponents and simple
    fractions. When the text holds several numbers, ``which`` picks the first or the last one (the
    last is the usual convention for "... so the answer is 42").

    Args:
        text: A string (or a number, returned as float; ``bool`` is not a number here).
        which: ``"last"`` (default) or ``"first"`` number in the text.
        fractions: Read ``"3/4"`` as 0.75; with ``False`` it is the two numbers 3 and 4 (for "4/5" ratings).

    Example:
        >>> [parse_number(s) for s in ["1,234", "$5.50", "-3", "1e3", "3/4", "x = 2, so 7."]]
        [1234.0, 5.5, -3.0, 1000.0, 0.75, 7.0]
        >>> parse_number("no digits") is None
        True
    """
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    matches = list((_NUMBER if fractions else _NUMBER_NO_FRACTION).finditer(str(text)))
    if not matches:
        return None
    m = matches[0] if which == "first" else matches[-1]
    value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
    den = m.groupdict().get("den")
    if den is not None:
        if float(den) == 0:
            return None
        value /= float(den)
    if m.group("sign") in ("-", "\u2212"):
        value = -value
    return value


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is_type(value: Any, name: str) -> bool:
    if name not in _TYPES:
        raise ValueError(f"unsupported JSON-schema type {name!r}; use one of {sorted(_TYPES)}")
    if isinstance(value, bool) and name in ("number", "integer"):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def validate_json_schema(instance: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Validate ``instance`` against a small JSON-schema subset; return the list of problems (empty if valid).

    Supported keywords: ``type`` (a name or a list of names), ``properties``, ``required``, ``items``
    (one schema for every element) and ``enum``. Other keywords are ignored. Components use the
    ``jsonschema`` package instead when it is importable.

    Example:
        >>> schema = {"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}
        >>> validate_json_schema({"age": 3}, schema)
        []
        >>> validate_json_schema({"age": "3"}, schema)
        ["$.age: expected type 'integer', got str"]
    """
    errors: list[str] = []
    if "enum" in schema and instance not in list(schema["enum"]):
        errors.append(f"{path}: {instance!r} is not one of {list(schema['enum'])!r}")
    if "type" in schema:
        names = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        if not any(_is_type(instance, n) for n in names):
            want = names[0] if len(names) == 1 else names
            errors.append(f"{path}: expected type {want!r}, got {type(instance).__name__}")
            return errors  # nested checks make no sense on the wrong type
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                errors.append(f"{path}: missing required property {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                errors.extend(validate_json_schema(instance[key], sub, f"{path}.{key}"))
    if isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(instance):
            errors.extend(validate_json_schema(item, schema["items"], f"{path}[{i}]"))
    return errors
