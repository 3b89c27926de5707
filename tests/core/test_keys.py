"""API keys' shape (pcq/keys.py): minted keys match the pattern the README gives secret scanners,
any single-character slip is refused as malformed before a lookup, keys of the older shape still
reach the lookup, and ``--expires-in`` takes a duration or says what it wants."""

from __future__ import annotations

import re
import secrets
import string
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcq.keys import (
    BAD_CHECKSUM,
    CHECKSUM_LENGTH,
    KEY_PATTERN,
    NOT_A_KEY,
    MalformedKey,
    checksum,
    mint_key,
    parse_key,
    parse_lifetime,
    verify,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_a_minted_key_has_the_pattern_a_prefix_and_a_checksum_of_the_rest() -> None:
    key = mint_key("pepper")
    assert re.fullmatch(KEY_PATTERN, key.plaintext)
    assert len(key.plaintext) == 55
    assert key.plaintext.startswith(f"pcq_{key.prefix}_")
    body, check = key.plaintext[:-CHECKSUM_LENGTH], key.plaintext[-CHECKSUM_LENGTH:]
    assert check == checksum(body)
    assert parse_key(key.plaintext) == key.prefix
    assert verify(key.plaintext, key.key_hash, "pepper")
    assert not verify(key.plaintext, key.key_hash, "another pepper")


def test_the_checksum_is_the_crc32_in_six_base62_characters() -> None:
    digits = string.digits + string.ascii_uppercase + string.ascii_lowercase
    for body in ("", "pcq_000000000000_", "x" * 100):
        value = 0
        for c in checksum(body):
            value = value * 62 + digits.index(c)
        assert value == zlib.crc32(body.encode())
        assert len(checksum(body)) == 6
    assert checksum("") == "000000"  # CRC32 of nothing is 0: padded, not shortened


def test_the_readme_gives_the_pattern_secret_scanners_need() -> None:
    assert KEY_PATTERN in README


def test_a_key_is_one_word_a_double_click_selects_whole() -> None:
    for _ in range(200):
        assert re.fullmatch(r"\w+", mint_key("").plaintext, flags=re.ASCII)


KEYS = st.builds(lambda _: mint_key("").plaintext, st.integers())
ANY_CHAR = st.characters(codec="utf-8") | st.sampled_from(string.ascii_letters + string.digits + "_-")


@given(key=KEYS, data=st.data())
def test_any_single_character_slip_is_refused_as_malformed(key: str, data: st.DataObject) -> None:
    """A substitution, a dropped or an added character anywhere: caught by the shape check (the
    prefix, the lengths, the alphabet) or by the checksum, so it never reaches the database."""
    at = data.draw(st.integers(0, len(key) - 1), label="at")
    kind = data.draw(st.sampled_from(["replace", "drop", "add"]), label="kind")
    c = data.draw(ANY_CHAR.filter(lambda c: c != key[at]), label="char")
    slipped = {
        "replace": key[:at] + c + key[at + 1 :],
        "drop": key[:at] + key[at + 1 :],
        "add": key[:at] + c + key[at:],
    }[kind]
    with pytest.raises(MalformedKey) as refused:
        parse_key(slipped)
    assert str(refused.value) in (NOT_A_KEY, BAD_CHECKSUM)


def test_a_typo_in_the_secret_says_the_checksum_does_not_match() -> None:
    key = mint_key("").plaintext
    typo = key[:30] + ("a" if key[30] != "a" else "b") + key[31:]
    with pytest.raises(MalformedKey, match="checksum does not match"):
        parse_key(typo)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nope",
        "pcq_",
        "pcq_000000000000",
        "ghp_000000000000_" + "a" * 38,
        "pcq_00000000000G_" + "a" * 38,  # not hex
        "pcq_0000000000000_" + "a" * 37,  # a longer prefix
        "pcq_000000000000_" + "a" * 37,  # truncated
        "pcq_000000000000_" + "a" * 39,
        "pcq_000000000000_" + "a" * 37 + "-",  # not base62
        "pcq_000000000000_" + "a" * 31 + "é",  # not the older shape's alphabet either
    ],
)
def test_text_of_another_shape_is_not_a_key(text: str) -> None:
    with pytest.raises(MalformedKey, match="malformed API key: a key is pcq_, 12 hex digits"):
        parse_key(text)


def test_a_key_of_the_older_shape_without_a_checksum_goes_on_to_the_lookup() -> None:
    prefix = secrets.token_hex(6)
    for _ in range(50):  # token_urlsafe's alphabet has - and _, which the older keys hold
        assert parse_key(f"pcq_{prefix}_{secrets.token_urlsafe(24)}") == prefix
    assert parse_key(f"pcq_{prefix}_{'-_' * 16}") == prefix


@pytest.mark.parametrize(
    ("text", "lifetime"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("2w", timedelta(weeks=2)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        (" 7d ", timedelta(days=7)),
        ("3650d", timedelta(days=3650)),
    ],
)
def test_expires_in_takes_a_whole_number_and_a_unit(text: str, lifetime: timedelta) -> None:
    assert parse_lifetime(text) == lifetime


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0d", "more than 0"),
        ("-3d", "more than 0"),
        ("90", "a whole number and a unit"),
        ("d", "a whole number and a unit"),
        ("1.5d", "a whole number and a unit"),
        ("90 days", "a whole number and a unit"),
        ("90y", "a whole number and a unit"),
        ("", "a whole number and a unit"),
        ("9" * 5000 + "d", "a whole number and a unit"),
        ("3651d", "at most 10 years"),
        ("999999999999w", "at most 10 years"),
    ],
)
def test_expires_in_refuses_zero_negative_and_garbage_saying_what_it_wants(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_lifetime(text)
