"""Standard Webhooks v1 signing (pcq/webhooks.py), checked by the reference receiver library,
``standardwebhooks``, exactly as a receiver verifies a delivery."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pcq.webhooks import new_secret, secret_key, signature, signed_headers

BODY = json.dumps(
    {"type": "job.succeeded", "timestamp": "2026-11-29T19:00:00Z", "data": {"id": "job_1"}}
).encode()


def test_a_new_secret_is_whsec_and_base64_of_32_random_bytes() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
        assert secret_key(secret) == base64.b64decode(secret[6:])


def test_signed_headers_verify_with_standardwebhooks() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signed_headers([secret], "evt_1", now, BODY)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("pcq-webhooks/")
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_the_signature_is_the_one_standardwebhooks_computes() -> None:
    secret = new_secret()
    stamp = 1_800_000_000
    expected = Webhook(secret).sign("evt_9", datetime.fromtimestamp(stamp, UTC), BODY.decode())
    assert signature([secret], "evt_9", stamp, BODY) == expected


def test_two_secrets_give_two_v1_entries_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = signed_headers([new, old], "evt_2", int(time.time()), BODY)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    assert all(e.startswith("v1,") for e in entries)
    assert entries[0] == signature([new], "evt_2", int(headers["webhook-timestamp"]), BODY)
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)


def test_a_wrong_secret_does_not_verify() -> None:
    headers = signed_headers([new_secret()], "evt_3", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_an_altered_body_does_not_verify() -> None:
    secret = new_secret()
    headers = signed_headers([secret], "evt_4", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"job_1", b"job_2"), headers)


def test_an_altered_timestamp_or_id_does_not_verify() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signed_headers([secret], "evt_5", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-timestamp": str(now - 1)})
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "evt_6"})


def test_the_signature_covers_the_exact_bytes_sent() -> None:
    """Re-serialising the same JSON differently (spacing) is another body: it does not verify."""
    secret = new_secret()
    headers = signed_headers([secret], "evt_7", int(time.time()), BODY)
    respaced = json.dumps(json.loads(BODY), separators=(",", ":")).encode()
    assert respaced != BODY
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(respaced, headers)


@pytest.mark.parametrize("msg_id", ["", "evt.1", "evt\r\n1"])
def test_an_id_that_would_make_the_signed_content_ambiguous_is_refused(msg_id: str) -> None:
    with pytest.raises(ValueError, match="msg_id"):
        signature([new_secret()], msg_id, 1, BODY)


@pytest.mark.parametrize("secret", ["", "whsec_", "sk_abc", "whsec_not base64!"])
def test_a_malformed_secret_is_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        signature([secret], "evt_8", 1, BODY)


def test_no_secret_signs_nothing() -> None:
    with pytest.raises(ValueError, match="secret"):
        signature([], "evt_8", 1, BODY)
