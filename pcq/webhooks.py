"""Standard Webhooks v1 signing: the secrets and the headers of a signed delivery.

Pure: no I/O. A tenant's secrets are kept by pcq.repositories.webhooks; the worker's sender
(worker/webhook_net.py) posts the bytes these headers sign. The spec
(github.com/standard-webhooks/standard-webhooks, ``spec/standard-webhooks.md``):

- a secret is ``whsec_`` + base64 of random bytes (24 to 64; pcq uses 32); the HMAC key is
  the decoded bytes;
- ``webhook-signature`` is a space-separated list of ``v1,<base64 HMAC-SHA256>`` over
  ``{webhook-id}.{webhook-timestamp}.{body}``, one entry per secret that signs (two or more
  while a rotated secret is in its grace period), so a receiver holding either key verifies;
- ``webhook-id`` is the same on every attempt of one event (the receiver's dedup key),
  ``webhook-timestamp`` is the attempt's Unix time in seconds.

The signature covers the exact bytes sent: sign the body once it is serialised, and never
re-serialise it after.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as random_source
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105  (the format's prefix, not a secret)
SECRET_BYTES = 32
USER_AGENT = "pcq-webhooks/1"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + standard base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_source.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_…`` secret stands for (ValueError if it is not one)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is 'whsec_' + base64") from None
    if not key:
        raise ValueError("a webhook secret holds no key")
    return key


def _check_part(name: str, value: str) -> None:
    # The signed content is "{id}.{timestamp}.{body}": a "." (or a line break, which would
    # end the header) in either part would make two messages sign alike.
    if not value or any(c in value for c in ".\r\n"):
        raise ValueError(f"{name} must be non-empty, without '.' or line breaks")


def signature(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64>`` per secret, in the order given,
    space-separated. ``timestamp`` is Unix seconds; ``body`` the exact bytes sent."""
    if not secrets:
        raise ValueError("at least one secret must sign")
    _check_part("msg_id", msg_id)
    stamp = str(int(timestamp))
    signed = f"{msg_id}.{stamp}.".encode() + body
    entries = []
    for secret in secrets:
        digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
        entries.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(entries)


def signed_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one delivery attempt of a JSON body: the three of Standard Webhooks,
    ``content-type`` and ``user-agent``."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
