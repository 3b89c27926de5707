"""``GET /v1/webhooks/secret`` and ``POST /v1/webhooks/secret/rotate`` on SQLite and on the
real PostgreSQL: the secret is created on first use, rotation gives a new one while the old
keeps signing for PCQ_WEBHOOK_SECRET_GRACE_SECONDS, and each tenant sees only its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.models import utcnow
from pcq.repositories.webhooks import signing_secrets
from pcq.tenants import authenticate, create_key_at
from pcq.webhooks import signed_headers
from tests.conftest import make_settings

BODY = b'{"type": "job.succeeded", "timestamp": "2026-11-29T19:00:00Z", "data": {"id": "job_1"}}'


@dataclass
class Api:
    client: TestClient
    key: str
    other_key: str
    db_url: str

    def h(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def secret(self, key: str | None = None) -> str:
        r = self.client.get("/v1/webhooks/secret", headers=self.h(key))
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return str(r.json()["secret"])

    def rotate(self, key: str | None = None) -> str:
        r = self.client.post("/v1/webhooks/secret/rotate", headers=self.h(key))
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return str(r.json()["secret"])

    def signing(self, key: str, later: float = 0) -> list[str]:
        """What a delivery to this key's tenant is signed with, ``later`` seconds from now."""
        engine = make_engine(self.db_url)
        try:
            with unit_of_work(make_session_factory(engine)) as s:
                tenant = authenticate(s, key, "", utcnow())
                assert tenant is not None
                return signing_secrets(s, [tenant], now=utcnow() + timedelta(seconds=later))[tenant]
        finally:
            engine.dispose()


def _api(db_url: str, **env: object) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://", **env)
    with TestClient(create_app(settings)) as client:
        yield Api(client, create_key_at(db_url, "acme"), create_key_at(db_url, "globex"), db_url)


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    yield from _api(db_url)


def test_the_first_get_creates_the_secret_and_a_repeat_returns_it(api: Api) -> None:
    secret = api.secret()
    assert secret.startswith("whsec_")
    assert len(secret) == 50
    assert api.secret() == secret
    assert api.signing(api.key) == [secret]


def test_rotate_returns_a_new_secret_that_get_then_returns(api: Api) -> None:
    old = api.secret()
    new = api.rotate()
    assert new != old
    assert new.startswith("whsec_")
    assert api.secret() == new


def test_rotate_before_any_get_makes_the_first_secret(api: Api) -> None:
    secret = api.rotate()
    assert api.secret() == secret
    assert api.signing(api.key) == [secret]


def test_during_the_grace_period_a_delivery_verifies_with_either_secret(api: Api) -> None:
    old = api.secret()
    new = api.rotate()
    keys = api.signing(api.key)
    assert keys == [new, old]
    headers = signed_headers(keys, "evt_1", int(time.time()), BODY)
    assert headers["webhook-signature"].count("v1,") == 2
    assert Webhook(old).verify(BODY, headers)["data"] == {"id": "job_1"}
    assert Webhook(new).verify(BODY, headers)["data"] == {"id": "job_1"}


def test_after_the_grace_period_only_the_new_secret_verifies(api: Api) -> None:
    old = api.secret()
    new = api.rotate()
    keys = api.signing(api.key, later=86400 + 1)  # PCQ_WEBHOOK_SECRET_GRACE_SECONDS' default
    assert keys == [new]
    headers = signed_headers(keys, "evt_1", int(time.time()), BODY)
    Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(BODY, headers)


def test_the_grace_period_is_the_setting(db_url: str) -> None:
    for api in _api(db_url, PCQ_WEBHOOK_SECRET_GRACE_SECONDS=0):
        api.secret()
        new = api.rotate()
        assert api.signing(api.key) == [new]


def test_rotate_with_expire_previous_leaves_only_the_new_secret_signing(api: Api) -> None:
    first = api.secret()
    second = api.rotate()
    assert api.signing(api.key) == [second, first]
    r = api.client.post("/v1/webhooks/secret/rotate?expire_previous=true", headers=api.h())
    assert r.status_code == 200, r.text
    third = r.json()["secret"]
    assert api.signing(api.key) == [third]
    headers = signed_headers([third], "evt_1", int(time.time()), BODY)
    for old in (first, second):
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(BODY, headers)


@pytest.mark.parametrize("query", ["expire_previous=perhaps", "expire_previous=true&expire_previous=false"])
def test_rotate_refuses_a_bad_expire_previous_and_rotates_nothing(api: Api, query: str) -> None:
    secret = api.secret()
    r = api.client.post(f"/v1/webhooks/secret/rotate?{query}", headers=api.h())
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert api.secret() == secret


def test_each_tenant_has_its_own_secret(api: Api) -> None:
    mine = api.secret()
    theirs = api.secret(api.other_key)
    assert mine != theirs
    rotated = api.rotate(api.other_key)
    assert api.secret() == mine  # another tenant's rotation changes nothing of mine
    assert api.signing(api.key) == [mine]
    assert api.signing(api.other_key) == [rotated, theirs]


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/webhooks/secret"), ("POST", "/v1/webhooks/secret/rotate")]
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}], ids=["missing", "invalid"])
def test_the_secret_routes_need_a_key(api: Api, method: str, path: str, headers: dict[str, str]) -> None:
    r = api.client.request(method, path, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert "whsec_" not in r.text


def test_the_secret_is_never_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [api.secret(), api.rotate(), api.secret(api.other_key)]
    text = caplog.text
    for secret in secrets:
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text


def test_the_routes_are_documented(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    get = doc["paths"]["/v1/webhooks/secret"]["get"]
    rotate = doc["paths"]["/v1/webhooks/secret/rotate"]["post"]
    for op in (get, rotate):
        assert op["tags"] == ["webhooks"]
        assert {"200", "401", "429", "503"} <= set(op["responses"])
        assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/WebhookSecretOut"
        }
    assert "422" in rotate["responses"]
    assert [p["name"] for p in rotate["parameters"]] == ["expire_previous"]
