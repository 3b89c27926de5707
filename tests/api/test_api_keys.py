"""API keys through the real app on SQLite and on the real PostgreSQL: a key of the older shape
still works, a typo answers 401 saying so without touching the database, an expired key answers
401 from its expiry on, and the key's use is committed as last_used_at."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from api.app import create_app
from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.keys import checksum, hash_secret
from pcq.models import ApiKey, Tenant, utcnow
from pcq.tenants import create_key_at
from tests.conftest import make_settings


@dataclass
class App:
    client: TestClient
    db_url: str
    sessions: SessionFactory

    def get(self, key: str) -> Any:
        return self.client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def app(db_url: str) -> Iterator[App]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    engine = make_engine(db_url)
    with TestClient(create_app(settings)) as client:
        yield App(client, db_url, make_session_factory(engine))
    engine.dispose()


def test_a_key_minted_before_the_checksum_still_works(app: App) -> None:
    prefix = secrets.token_hex(6)
    key = f"pcq_{prefix}_{'-_' * 4}{secrets.token_urlsafe(18)}"  # the older shape, - and _ in it
    with unit_of_work(app.sessions) as s:
        s.add(Tenant(id="ten_old", name="old"))
        s.flush()
        s.add(ApiKey(id="key_old", tenant_id="ten_old", prefix=prefix, key_hash=hash_secret(key, "")))
    assert app.get(key).status_code == 200
    assert app.client.get("/v1/jobs", headers={"x-api-key": key}).status_code == 200


def test_a_typo_answers_401_for_its_checksum_without_a_database_statement(app: App) -> None:
    key = create_key_at(app.db_url, "acme")
    assert app.get(key).status_code == 200
    typo = key[:20] + ("Q" if key[20] != "Q" else "R") + key[21:]
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    engine = app.client.app.state.resources.db_engine  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", count)
    try:
        r = app.get(typo)
        short = app.get(key[:-3])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert r.status_code == 401
    assert r.json() == {
        "error": "unauthorized",
        "detail": "malformed API key: its checksum does not match (a typo?)",
    }
    assert short.status_code == 401
    assert short.json()["detail"].startswith("malformed API key: a key is pcq_, 12 hex digits")
    assert statements == []


def test_a_wrong_secret_and_a_revoked_key_answer_the_same(app: App) -> None:
    key = create_key_at(app.db_url, "acme")
    body = key[:17] + "A" * 32
    wrong = app.get(body + checksum(body))
    with unit_of_work(app.sessions) as s:
        s.execute(update(ApiKey).values(revoked_at=utcnow()))
    revoked = app.get(key)
    assert wrong.status_code == revoked.status_code == 401
    assert wrong.json() == revoked.json() == {"error": "unauthorized", "detail": "invalid or revoked API key"}


def test_an_expired_key_answers_401_saying_it_expired(app: App) -> None:
    key = create_key_at(app.db_url, "acme", expires_at=utcnow() + timedelta(hours=1))
    assert app.get(key).status_code == 200
    with unit_of_work(app.sessions) as s:
        s.execute(update(ApiKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = app.get(key)
    assert r.status_code == 401
    assert r.json()["detail"].startswith("expired API key (since ")
    assert key[17:] not in r.text


def test_a_request_commits_the_keys_last_used_at(app: App) -> None:
    key = create_key_at(app.db_url, "acme")
    before = utcnow()
    assert app.get(key).status_code == 200
    with app.sessions() as s:
        first = s.scalars(select(ApiKey.last_used_at)).one()
    assert first is not None
    assert before <= first <= utcnow()
    assert app.get(key).status_code == 200  # within the minute: kept
    with app.sessions() as s:
        assert s.scalars(select(ApiKey.last_used_at)).one() == first
