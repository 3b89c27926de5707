"""Reading JSON while keeping the exact text of each member, so what is forwarded is what came in.

A request is validated as parsed objects (pydantic), but it is *stored and sent upstream as the
text the user submitted*: re-serialising parsed objects changes key order (PostgreSQL ``jsonb``
sorts keys; a pydantic dump puts declared fields first and drops nulls) and can change numbers.
Key order is meaningful here: models write structured output in ``json_schema`` property order,
and Parallel's ``basis`` follows the fields.

``members`` walks one JSON object with the standard library's own scanner and returns, for
every key, the decoded value and the exact slice of text it was decoded from. The text is
valid JSON by construction, and it is what the upstream receives byte for byte. Non-standard
constants (``NaN``, ``Infinity``) are refused: the upstream would refuse them too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

_WS = re.compile(r"[ \t\n\r]*")
T = TypeVar("T")
MAX_DEPTH = 64  # nesting levels allowed in any submitted value (the upstream needs a handful)


class NotJson(ValueError):
    """The text is not the JSON expected; the message says where."""


def _no_constants(name: str) -> Any:
    raise NotJson(f"{name} is not valid JSON (use null or a number)")


_decoder = json.JSONDecoder(parse_constant=_no_constants)


@dataclass(frozen=True)
class Member:
    value: Any  # as json.loads gives it
    text: str  # the exact JSON text it was read from


def _skip(text: str, i: int) -> int:
    match = _WS.match(text, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


_STRING = re.compile(r'"(?:[^"\\]+|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth_ok(text: str) -> bool:
    """Whether brackets nest at most MAX_DEPTH deep outside strings: a cheap pre-check, so a
    hostile value cannot make the parser recurse until Python gives up."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return True
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        else:
            depth -= 1
    return True


def members(text: str) -> dict[str, Member]:
    """The members of the JSON object that is the whole of ``text`` (surrounding whitespace
    allowed). A key given twice keeps its last value, as ``json.loads`` does."""
    if not _depth_ok(text):  # told by the key of the member that nests too deep
        raise NotJson(_too_deep(text))
    try:
        return _members(text)
    except json.JSONDecodeError as exc:
        raise NotJson(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # belt and braces: _depth_ok should have refused it
        raise NotJson(f"nested more than {MAX_DEPTH} levels deep") from None


_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"|[\[\]{}]', re.S)


def _too_deep(text: str) -> str:
    """What to say of an object that nests too deep: which of its members does, by key."""
    depth = 0
    last_key = key = None
    for match in _TOKEN.finditer(text):
        found = match.group()
        if found[0] == '"':
            if depth == 1:  # at the object's top level, the last string before a bracket is its key
                last_key = found
        elif found in "[{":
            depth += 1
            if depth == 2:
                key = last_key
            if depth > MAX_DEPTH:
                break
        else:
            depth -= 1
    try:
        name = json.loads(key) if key is not None else None
    except ValueError:
        name = None
    shown = name[:100].encode("utf-8", "backslashreplace").decode() if isinstance(name, str) else ""
    where = f"{shown}: " if shown else ""
    return f"{where}nested more than {MAX_DEPTH} levels deep"


def _members(text: str) -> dict[str, Member]:
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        raise NotJson("not a JSON object")
    out: dict[str, Member] = {}
    i = _skip(text, i + 1)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise NotJson(f"not valid JSON (expected a key at character {i})")
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise NotJson(f"not valid JSON (expected ':' at character {i})")
            i = _skip(text, i + 1)
            value, end = _decoder.raw_decode(text, i)
            out.pop(key, None)  # a repeated key moves to its last place, as in json.loads
            out[key] = Member(value, text[i:end])
            i = _skip(text, end)
            sep = text[i : i + 1]
            i = _skip(text, i + 1)
            if sep == "}":
                break
            if sep != ",":
                raise NotJson(f"not valid JSON (expected ',' or '}}' at character {i - 1})")
    if _skip(text, i) != len(text):
        raise NotJson(f"not valid JSON (extra data at character {i})")
    return out


def decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotJson("not valid UTF-8") from None
