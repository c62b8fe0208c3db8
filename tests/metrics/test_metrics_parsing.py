"""Tests for metrics.parsing: SQuAD normalisation, number parsing, the JSON-schema subset."""

import pytest

from metrics.parsing import normalize_text, parse_number, validate_json_schema


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The   Eiffel Tower. ", "eiffel tower"),
        ("An apple, a day!", "apple day"),
        ("THE END", "end"),
        ("theater", "theater"),  # articles only as whole words
        ("rock'n'roll", "rocknroll"),
        ("ÉCOLE", "école"),  # casefold, not ascii-fold
        ("", ""),
        (42, "42"),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("1,234", 1234.0),
        ("1,234,567.5", 1234567.5),
        ("$5.50", 5.5),
        ("-$3", -3.0),
        ("-3", -3.0),
        ("+7", 7.0),
        ("1e3", 1000.0),
        ("2.5E-2", 0.025),
        (".5", 0.5),
        ("3/4", 0.75),
        ("costs €12", 12.0),
        ("The answer is 42.", 42.0),
        ("x = 3, so the total is 17", 17.0),  # last number by default
        ("5-3", 3.0),  # the hyphen after a digit is not a sign
        ("−4", -4.0),  # unicode minus
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "no digits here", "abc", None, True, "1/0", "x2y"])
def test_parse_number_unparseable(text):
    assert parse_number(text) is None


def test_parse_number_first():
    assert parse_number("4 out of 5", which="first") == 4.0
    assert parse_number("4 out of 5") == 5.0
    assert parse_number("4/5", which="first", fractions=False) == 4.0
    assert parse_number("4/5", which="last", fractions=False) == 5.0


SCHEMA = {
    "type": "object",
    "required": ["name", "tags"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": ["integer", "null"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "kind": {"enum": ["x", "y"]},
    },
}


@pytest.mark.parametrize(
    ("instance", "errors"),
    [
        ({"name": "n", "tags": []}, []),
        ({"name": "n", "tags": ["a", "b"], "age": 3, "kind": "x"}, []),
        ({"name": "n", "tags": [], "age": None}, []),
        ({"name": "n", "tags": [], "age": 3.0}, []),  # 3.0 is an integer in JSON schema
        ({"tags": []}, ["$: missing required property 'name'"]),
        ({"name": 1, "tags": []}, ["$.name: expected type 'string', got int"]),
        ({"name": "n", "tags": ["c"]}, ["$.tags[0]: 'c' is not one of ['a', 'b']"]),
        ({"name": "n", "tags": "a"}, ["$.tags: expected type 'array', got str"]),
        ({"name": "n", "tags": [], "age": True}, ["$.age: expected type ['integer', 'null'], got bool"]),
        ({"name": "n", "tags": [], "kind": "z"}, ["$.kind: 'z' is not one of ['x', 'y']"]),
        ([], ["$: expected type 'object', got list"]),
    ],
)
def test_validate_json_schema(instance, errors):
    assert validate_json_schema(instance, SCHEMA) == errors


def test_validate_json_schema_number_excludes_bool_and_unknown_type_raises():
    assert validate_json_schema(1.5, {"type": "number"}) == []
    assert validate_json_schema(True, {"type": "number"}) != []
    with pytest.raises(ValueError, match="unsupported JSON-schema type"):
        validate_json_schema(1, {"type": "decimal"})
