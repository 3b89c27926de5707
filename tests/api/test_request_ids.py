"""api.request_ids: which X-Request-ID values are kept, and that every response echoes the id
(errors included), through the app as the API builds it."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.request_ids import request_id
from pcq.db import make_engine, make_session_factory
from pcq.models import Job
from pcq.tenants import create_key_at
from tests.conftest import make_settings

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("sent", [b"abc", b"Trace_1.2-3", b"x" * 64, b"a!#$%&'*+.^_`|~-z"])
def test_a_sane_id_is_kept(sent: bytes) -> None:
    assert request_id([(b"x-request-id", sent)]) == sent.decode()


@pytest.mark.parametrize("sent", [b"", b"x" * 65, b"two words", b'a"b', b"a\x01b", b"a\tb", "café".encode()])
def test_an_insane_id_is_replaced(sent: bytes) -> None:
    assert GENERATED.fullmatch(request_id([(b"x-request-id", sent)]))


def test_none_sent_gives_a_new_one_each_time() -> None:
    assert request_id([]) != request_id([])


def test_every_response_echoes_it(sqlite_url: str) -> None:
    with TestClient(create_app(make_settings(DATABASE_URL=sqlite_url))) as client:
        assert client.get("/healthz", headers={"X-Request-ID": "hc-1"}).headers["x-request-id"] == "hc-1"
        r = client.post("/v1/jobs", json={}, headers={"X-Request-ID": "no-key"})
        assert r.status_code == 401
        assert r.headers["x-request-id"] == "no-key"
        r = client.get("/v1/nowhere", headers={"X-Request-ID": "x" * 65})
        assert r.status_code == 404
        assert GENERATED.fullmatch(r.headers["x-request-id"])


def test_the_jobs_a_request_creates_keep_its_id(sqlite_url: str) -> None:
    """On SQLite (INSERTs; PostgreSQL's COPY is covered end to end in tests/e2e/test_logs.py)."""
    key = create_key_at(sqlite_url, "t")
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}
    lines = "".join(json.dumps({"custom_id": f"c{i}", "body": body}) + "\n" for i in range(3))
    with TestClient(create_app(make_settings(DATABASE_URL=sqlite_url))) as client:
        job = client.post(
            "/v1/jobs",
            json={"request": body},
            headers={**auth, "X-Request-ID": "one-job"},
        )
        assert job.status_code == 202
        batch = client.post(
            "/v1/batches",
            content=lines,
            headers={**auth, "X-Request-ID": "one-batch", "Content-Type": "application/x-ndjson"},
        )
        assert batch.status_code == 202
        untraced = client.post(
            "/v1/batches", content=lines, headers={**auth, "Content-Type": "application/x-ndjson"}
        )
        generated = untraced.headers["x-request-id"]
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            rows = {(j.batch_id, j.request_id) for j in session.query(Job)}
    finally:
        engine.dispose()
    assert rows == {
        (None, "one-job"),
        (batch.json()["id"], "one-batch"),
        (untraced.json()["id"], generated),
    }
