"""API keys: ``pcq_<prefix>_<secret>``; the prefix finds the row, only a hash is stored.

Keys carry 190 random bits, so one HMAC-SHA256 (with an optional pepper) is enough; a slow
password hash would add latency to every request for no gain at that entropy.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_SCHEME = "pcq"


@dataclass(frozen=True)
class NewKey:
    plaintext: str
    prefix: str
    key_hash: str


def hash_secret(secret: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def mint_key(pepper: str) -> NewKey:
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    plaintext = f"{KEY_SCHEME}_{prefix}_{secret}"
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_secret(plaintext, pepper))


def split_prefix(presented: str) -> str | None:
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or len(parts[1]) != 12:
        return None
    if parts[1].strip("0123456789abcdef"):  # minted prefixes are hex; anything else is no key
        return None
    return parts[1]


def verify(presented: str, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_secret(presented, pepper), stored_hash)
