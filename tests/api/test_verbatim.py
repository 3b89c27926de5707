"""api/verbatim.py: each member's exact text, or a NotJson that says what is wrong."""

from __future__ import annotations

import json

import pytest

from api.verbatim import MAX_DEPTH, NotJson, members


def test_members_keep_each_value_and_its_exact_text() -> None:
    text = ' { "b" : {"z": 1, "a": [1.0, 2e3, 0.50, 123456789012345678901234567890]},'
    text += '"a":"h\\u00e9\\u0000é" } '
    found = members(text)
    assert list(found) == ["b", "a"]
    assert found["b"].text == '{"z": 1, "a": [1.0, 2e3, 0.50, 123456789012345678901234567890]}'
    assert found["b"].value == json.loads(found["b"].text)
    assert found["a"].text == '"h\\u00e9\\u0000é"'
    assert found["a"].value == "hé\x00é"


def test_a_repeated_key_keeps_its_last_value_as_json_loads_does() -> None:
    found = members('{"a": 1, "b": 2, "a": 3}')
    assert {k: m.value for k, m in found.items()} == json.loads('{"a": 1, "b": 2, "a": 3}')
    assert found["a"].text == "3"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"a": NaN}', "NaN"),
        ('{"a": Infinity}', "Infinity"),
        ('{"a": 1,}', "expected a key"),
        ('{"a": 1} x', "extra data"),
        ('{"a" 1}', "expected ':'"),
        ('{"a": 1 "b": 2}', "expected ','"),
        ("[1, 2]", "not a JSON object"),
        ('{"a": [1, 2}', "not valid JSON"),
        ('{"a": "\x00"}', "not valid JSON"),  # a raw control character in a string
        ('{"a": ' + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "}", "nested more than"),
    ],
)
def test_what_is_not_json_is_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(NotJson, match=says):
        members(text)


def test_brackets_inside_strings_do_not_count_toward_the_depth() -> None:
    text = '{"a": "' + "[" * 1000 + '", "b": [[1]]}'
    assert members(text)["b"].value == [[1]]
