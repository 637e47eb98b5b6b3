"""Unit tests of the strict JSON parsing every request body goes through (``api.http``)."""

from __future__ import annotations

import pytest

from serve_app.api.errors import ApiError
from serve_app.api.http import MAX_JSON_DEPTH, parse_json


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"a": "\xff"}', "not valid UTF-8 (byte 7)"),
        (b'{"a": 1, "a": 2}', "the key 'a' appears twice"),
        (b'{"a": {"b": 1, "b": 1}}', "the key 'b' appears twice"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"a": 1e999}', "the number 1e999 is out of range"),
        (b'{"a": ' + b"1" * 5000 + b"}", "4300 digits"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "deeper than 32 levels"),
        (b"[" * 100_000 + b"]" * 100_000, "deeper than 32 levels"),
        (b'{"a": ', "Expecting value (line 1, column 7)"),
    ],
)
def test_a_body_that_is_not_strict_json_is_a_400_naming_the_problem(
    body: bytes, problem: str
) -> None:
    with pytest.raises(ApiError) as raised:
        parse_json(body)
    error = raised.value
    assert (error.status, error.code) == (400, "invalid_json")
    assert error.message.startswith("the request body is not valid JSON: ")
    assert problem in error.message


def test_strict_json_parses_what_the_standard_allows() -> None:
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(b'{"a": [1, 2.5, "\\u0000", null, true], "b": {"c": -1e308}}') == {
        "a": [1, 2.5, "\x00", None, True],
        "b": {"c": -1e308},
    }
    assert parse_json(nested) is not None
    assert parse_json(b'"\\ud800"') == "\ud800"  # valid JSON; the request models refuse it
