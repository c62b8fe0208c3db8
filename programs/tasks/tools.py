"""Tools for agent programs: a safe calculator, a corpus lookup and a unit converter.

Why these are careful: model output is untrusted input. The calculator parses arithmetic with a small AST
whitelist (never ``eval``/``exec``) and bounds exponents and magnitudes; the lookup is a parameterised search of
the in-memory corpus; nothing touches a shell or the file system. A tool raises ``ToolError`` with a short
message on bad arguments; ``dspy.ReAct`` shows that message to the agent as the step's observation.

Example:
    >>> calculator("(1966 - 1932) * 2")
    '68'
    >>> convert_units(100, "m", "ft")
    '328.084'
"""

from __future__ import annotations

import ast
import math
import operator
import re

import dspy

from programs.tasks.corpus import Retriever, default_retriever

__all__ = ["ToolError", "calculator", "convert_units", "lookup_tool", "make_tools"]

MAX_EXPRESSION_CHARS = 200
# A number run into a keyword ("1966or 2") is a SyntaxWarning, not an error, in Python's tokenizer: printed once per
# rollout that writes one, from whichever thread parsed it. Refused before parsing instead (warnings.catch_warnings
# would be the other way, and it is not thread-safe).
_NUMBER_INTO_KEYWORD = re.compile(r"\d(?:and|or|in|is|if|else|not|for)\b")
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e18


class ToolError(ValueError):
    """A tool was called with arguments it cannot use (the message is shown to the agent)."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE):
            raise ToolError(f"exponent too large (at most {MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise ToolError("division by zero") from exc
        except OverflowError as exc:  # a float power past 1e308 (1e10 ** 40): the same refusal as any large result
            raise ToolError(f"result out of range (magnitude above {MAX_MAGNITUDE:g})") from exc
        if isinstance(value, complex):  # (-8) ** 0.5
            raise ToolError("result is not a real number (a fractional power of a negative number)")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError(f"result out of range (magnitude above {MAX_MAGNITUDE:g})")
        return value
    raise ToolError(f"unsupported syntax {type(node).__name__}: use numbers, + - * / // % ** and parentheses")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with numbers, + - * / // % ** and parentheses, e.g. '1966 - 1932'."""
    text = str(expression).strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if _NUMBER_INTO_KEYWORD.search(text):
        raise ToolError(f"cannot parse {text!r}: write plain arithmetic like '12 * (3 + 4)'")
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse {text!r}: write plain arithmetic like '12 * (3 + 4)'") from exc
    value = _evaluate(tree)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result is not a finite number")
        return str(int(value)) if value.is_integer() else f"{value:.10g}"
    return str(value)


# unit -> (dimension, factor to the base unit); temperatures are converted separately.
_UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "ft": ("length", 0.3048), "in": ("length", 0.0254), "yd": ("length", 0.9144), "mi": ("length", 1609.344),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
    "c": ("temperature", 1.0), "f": ("temperature", 1.0), "k": ("temperature", 1.0),
}
_ALIASES = {"meter": "m", "meters": "m", "metre": "m", "metres": "m", "kilometer": "km", "kilometers": "km",
            "foot": "ft", "feet": "ft", "inch": "in", "inches": "in", "mile": "mi", "miles": "mi", "yard": "yd",
            "yards": "yd", "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g", "pound": "lb",
            "pounds": "lb", "lbs": "lb", "ounce": "oz", "ounces": "oz", "second": "s", "seconds": "s",
            "minute": "min", "minutes": "min", "hour": "h", "hours": "h", "days": "day", "liter": "l",
            "liters": "l", "litre": "l", "gallon": "gal", "gallons": "gal", "celsius": "c", "fahrenheit": "f",
            "kelvin": "k", "°c": "c", "°f": "f"}


def _unit(name: str) -> str:
    key = str(name).strip().casefold()
    key = _ALIASES.get(key, key)
    if key not in _UNITS:
        raise ToolError(f"unknown unit {name!r}; known units: {', '.join(sorted(_UNITS))}")
    return key


def _to_kelvin(value: float, unit: str) -> float:
    return {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[unit]


def _from_kelvin(value: float, unit: str) -> float:
    return {"c": value - 273.15, "f": (value - 273.15) * 9 / 5 + 32, "k": value}[unit]


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a value between units of length (m, km, ft, mi, ...), mass (kg, lb, ...), time, volume or temperature."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"value must be a number, got {value!r}") from exc
    src, dst = _unit(from_unit), _unit(to_unit)
    if _UNITS[src][0] != _UNITS[dst][0]:
        raise ToolError(f"cannot convert {_UNITS[src][0]} ({from_unit}) to {_UNITS[dst][0]} ({to_unit})")
    if _UNITS[src][0] == "temperature":
        result = _from_kelvin(_to_kelvin(number, src), dst)
    else:
        result = number * _UNITS[src][1] / _UNITS[dst][1]
    return f"{result:.6g}"


def lookup_tool(retriever: Retriever | None = None) -> dspy.Tool:
    """A ``lookup(name)`` tool over the corpus: the passage titled ``name``, else the best BM25 match."""

    def lookup(name: str) -> str:
        """Look up a person, company, city or country by name and return its encyclopedia entry."""
        if not str(name).strip():
            raise ToolError("give a name to look up")
        passage = (retriever or default_retriever()).lookup(name)
        return str(passage) if passage is not None else f"No entry found for {name!r}."

    return dspy.Tool(lookup)


def make_tools(retriever: Retriever | None = None) -> list[dspy.Tool]:
    """The agent's tools: ``lookup``, ``calculator`` and ``convert_units``."""
    return [lookup_tool(retriever), dspy.Tool(calculator), dspy.Tool(convert_units)]
