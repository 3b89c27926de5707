"""API keys: ``pcq_<prefix>_<secret><checksum>``; the prefix finds the row, only a hash is stored.

A key is ``pcq_``, 12 hex digits (the prefix: public, it finds the key's row), ``_``, 32 base62
characters of secret and 6 base62 characters of checksum, 55 characters in all
(:data:`KEY_PATTERN`, the regex the README gives secret scanners). Letters, digits and ``_``
only, so a double-click selects the whole key. The checksum is GitHub's scheme: the CRC32 of
everything before it, in base62, so a typo or a truncated copy is refused as malformed without a
database lookup, and a scanner can tell a real key from a lookalike.

Keys minted before the checksum (``pcq_<prefix>_`` and 32 characters of ``token_urlsafe``)
have none; they are still looked up, and accepted, as before.

Keys carry 190 random bits, so one HMAC-SHA256 (with an optional pepper) is enough; a slow
password hash would add latency to every request for no gain at that entropy.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import timedelta

KEY_SCHEME = "pcq"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
PREFIX_LENGTH = 12  # hex digits
SECRET_LENGTH = 32  # base62 characters: 190 bits
CHECKSUM_LENGTH = 6  # base62 characters hold any CRC32 (62**6 > 2**32)
LEGACY_SECRET_LENGTH = 32  # token_urlsafe(24), no checksum
# For secret scanners (README); a test holds it to the lengths above.
KEY_PATTERN = r"pcq_[0-9a-f]{12}_[0-9A-Za-z]{38}"

_HEX = "0123456789abcdef"
_URLSAFE = string.ascii_letters + string.digits + "-_"


class MalformedKey(ValueError):
    """Text that cannot be a key pcq minted. The format is public, so the message may say what
    is wrong with it; nothing is looked up."""


NOT_A_KEY = (
    f"malformed API key: a key is {KEY_SCHEME}_, {PREFIX_LENGTH} hex digits, _ and "
    f"{SECRET_LENGTH + CHECKSUM_LENGTH} letters or digits (a truncated or mangled copy?)"
)
BAD_CHECKSUM = "malformed API key: its checksum does not match (a typo?)"


@dataclass(frozen=True)
class NewKey:
    plaintext: str
    prefix: str
    key_hash: str


def hash_secret(secret: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def checksum(body: str) -> str:
    """The CRC32 of ``body`` in base62, left-padded with ``0`` to 6 characters."""
    value = zlib.crc32(body.encode())
    digits = []
    for _ in range(CHECKSUM_LENGTH):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def mint_key(pepper: str) -> NewKey:
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    body = f"{KEY_SCHEME}_{prefix}_{''.join(secrets.choice(BASE62) for _ in range(SECRET_LENGTH))}"
    plaintext = body + checksum(body)
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_secret(plaintext, pepper))


def parse_key(presented: str) -> str:
    """The prefix of a presented key that may be genuine, for its row to be looked up.

    Raises MalformedKey for one that cannot be: not the key's shape, or (for a key with a
    checksum) a checksum that does not match. A key of the older shape, without a checksum,
    passes on to the lookup as before."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or len(parts[1]) != PREFIX_LENGTH or parts[1].strip(_HEX):
        raise MalformedKey(NOT_A_KEY)
    rest = parts[2]
    if len(rest) == LEGACY_SECRET_LENGTH and not rest.strip(_URLSAFE):
        return parts[1]
    if len(rest) != SECRET_LENGTH + CHECKSUM_LENGTH or rest.strip(BASE62):
        raise MalformedKey(NOT_A_KEY)
    if checksum(presented[:-CHECKSUM_LENGTH]) != presented[-CHECKSUM_LENGTH:]:  # public: no secret to time
        raise MalformedKey(BAD_CHECKSUM)
    return parts[1]


def verify(presented: str, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_secret(presented, pepper), stored_hash)


# --- a key's lifetime (``pcq keys create --expires-in``)

LIFETIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_LIFETIME = timedelta(days=3650)  # longer says no more than "never"; it also keeps dates in range


def parse_lifetime(text: str) -> timedelta:
    """``90d``, ``12h``, ``2w``, ``30m`` or ``45s`` as a timedelta; ValueError, with a message
    that says what to give, for anything else, for 0 or less and for more than 10 years."""
    match = re.fullmatch(r"\s*([+-]?\d{1,12})\s*([smhdw])\s*", text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: give a whole number and a unit s, m, h, d or w (12h, 90d, 2w)"
        )
    amount = int(match[1])
    if amount <= 0:
        raise ValueError(f"{text!r}: a key's lifetime must be more than 0")
    seconds = amount * LIFETIME_UNITS[match[2]]
    if seconds > MAX_LIFETIME.total_seconds():  # compared as a number: a timedelta this long overflows
        raise ValueError(f"{text!r}: at most 10 years (3650d); leave --expires-in out for a key without end")
    return timedelta(seconds=seconds)
