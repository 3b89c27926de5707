"""One tenant cannot take the API down with its uploads.

A real ``pcq api`` process on the real PostgreSQL, driven over raw sockets: a stalled upload holds
no database connection, gets 408 after ``PCQ_UPLOAD_TIMEOUT_SECONDS`` and is dropped, and the
uploads in progress are capped per tenant and in total (429 with Retry-After). In process: the
size limits of JSON batches and their requests, the caps on a request's messages and
characters, nesting, and blank lines.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import build_resources, create_app
from api.verbatim import MAX_DEPTH
from pcq.tenants import create_key_at
from tests.conftest import make_settings
from tests.stack import Stack, stack_env

REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}
LINE = json.dumps({"custom_id": "a", "body": REQ}) + "\n"
APP_NAME = "pcq-upload-test"
TIMEOUT = 3.0  # PCQ_UPLOAD_TIMEOUT_SECONDS of the process under test


# ------------------------------------------------------------------ a real API process


@pytest.fixture
def api(pg_url: str, tmp_path: Path) -> Iterator[Stack]:
    """``pcq api`` on the session's PostgreSQL; its connections carry APP_NAME."""
    env = stack_env(f"{pg_url}?application_name={APP_NAME}", None)
    env.update(
        PCQ_UPLOAD_TIMEOUT_SECONDS=str(TIMEOUT),
        PCQ_MAX_UPLOADS_PER_TENANT="2",
        PCQ_MAX_UPLOADS="3",
        PCQ_LOG_LEVEL="WARNING",
    )
    stack = Stack(env, tmp_path)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop_all()


def stall(api_url: str, key: str, path: str = "/v1/batches", length: int = 10_000_000) -> socket.socket:
    """Start an upload of ``length`` bytes, send a few bytes of it, and stop. Returns once the API reads the
    body (it answers ``Expect: 100-continue`` then): for a batch, authenticated and holding an
    upload slot."""
    host, port = api_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/x-ndjson\r\n"
        f"Content-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    assert sock.recv(100).startswith(b"HTTP/1.1 100 "), "the API did not start reading the body"
    sock.sendall(LINE[:20].encode())
    return sock


def answer(sock: socket.socket, within: float) -> tuple[bytes, bool]:
    """Everything the API sends until it closes the connection (or ``within`` seconds pass),
    and whether it closed it."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except TimeoutError:
        return data, False
    finally:
        sock.close()


def busy_connections(pg_url: str) -> list[tuple[str, str]]:
    """(state, query) of the API's database sessions that are not idle."""
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'",
            (APP_NAME,),
        ).fetchall()
    return [(str(state), str(query)) for state, query in rows]


@pytest.mark.realservices
def test_stalled_uploads_hold_no_connection_are_capped_and_get_408(api: Stack, pg_url: str) -> None:
    acme, globex, initech = (create_key_at(pg_url, t) for t in ("acme", "globex", "initech"))

    def post(key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
        return httpx.post(f"{api.api_url}/v1/batches", content=LINE, headers=headers, timeout=10)

    started = time.monotonic()
    stalled = [stall(api.api_url, acme), stall(api.api_url, acme)]
    stalled_job = stall(api.api_url, initech, "/v1/jobs", 100_000)  # any request body has the deadline

    # A third upload of the same tenant: 429, before its body is read.
    r = post(acme)
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "too_many_uploads"
    assert "PCQ_MAX_UPLOADS_PER_TENANT" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1

    # Another tenant's first upload takes the last slot; its second is over the total.
    stalled.append(stall(api.api_url, globex))
    r = post(globex)
    assert r.status_code == 429, r.text
    assert "PCQ_MAX_UPLOADS" in r.json()["detail"]
    assert "Retry-After" in r.headers

    # Three uploads wait for their bodies; not one holds a database session meanwhile, and
    # another tenant is served at once.
    assert busy_connections(pg_url) == []
    t0 = time.monotonic()
    r = httpx.get(f"{api.api_url}/v1/jobs", headers={"Authorization": f"Bearer {initech}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 2.0
    assert time.monotonic() - started < TIMEOUT, "too slow to test the slots before the deadline"

    # Each stalled upload gets 408 once its deadline passes, and its connection is closed.
    for sock in [*stalled, stalled_job]:
        data, closed = answer(sock, within=TIMEOUT + 10)
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert b"connection: close" in data.lower()
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"] == "request_timeout"
        assert "PCQ_UPLOAD_TIMEOUT_SECONDS" in body["detail"]
        assert closed, "the API kept a stalled client's connection open"
    assert time.monotonic() - started >= TIMEOUT

    # The slots are free again; nothing of the stalled uploads was stored.
    r = post(acme)
    assert r.status_code == 202, r.text
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM batches").fetchone() == (1,)


# ------------------------------------------------------------------------- in process


@pytest.fixture
def client(db_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = make_settings(
        DATABASE_URL=db_url,
        PCQ_BROKER_URL="memory://",
        PCQ_MAX_REQUEST_BYTES=4096,
        PCQ_MAX_BATCH_BYTES=65536,
        PCQ_MAX_BATCH_LINES=5,
    )
    with TestClient(create_app(settings)) as c:
        yield c, {"Authorization": f"Bearer {create_key_at(db_url, 'acme')}"}


def stored(c: TestClient, h: dict[str, str]) -> int:
    return len(c.get("/v1/jobs", headers=h).json()["data"])


def test_a_json_batch_request_over_the_request_limit_answers_413_naming_it(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    c, h = client
    big = {"custom_id": "b", "body": {**REQ, "messages": [{"role": "user", "content": "x" * 5000}]}}
    r = c.post("/v1/batches", json={"requests": [{"custom_id": "a", "body": REQ}, big]}, headers=h)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"
    assert r.json()["detail"] == "requests[1] is longer than 4096 bytes (PCQ_MAX_REQUEST_BYTES)"
    assert stored(c, h) == 0


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_json_batch_over_the_batch_limit_answers_413_naming_the_limit(
    client: tuple[TestClient, dict[str, str]], declared: bool
) -> None:
    c, h = client
    raw = json.dumps({"requests": [{"custom_id": f"c{i}", "body": REQ} for i in range(1000)]}).encode()
    content: Any = raw if declared else iter([raw[i : i + 8192] for i in range(0, len(raw), 8192)])
    r = c.post("/v1/batches", content=content, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "request body exceeds 65536 bytes (PCQ_MAX_BATCH_BYTES)"
    assert stored(c, h) == 0


def test_a_json_batch_is_stored_as_sent_its_members_in_any_order(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    c, h = client
    body = (
        '{"metadata": {"z": 1, "a": 2.50}, "requests": [{"custom_id": "a", "body": {"model": "lite", '
        '"messages": [{"role": "user", "content": "x"}], "temperature": 1.0}}], "webhook_url": "https://e.com/h"}'
    )
    r = c.post("/v1/batches", content=body, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 202, r.text
    assert r.json()["metadata"] == {"z": 1, "a": 2.5}
    assert r.json()["webhook_url"] == "https://e.com/h"
    assert list(r.json()["metadata"]) == ["z", "a"]


def test_blank_lines_count_toward_the_line_cap(client: tuple[TestClient, dict[str, str]]) -> None:
    c, h = client
    ndjson = {**h, "Content-Type": "application/x-ndjson"}
    r = c.post("/v1/batches", content="\n" * 5 + LINE, headers=ndjson)
    assert r.status_code == 413, r.text
    assert "at most 5 lines" in r.json()["detail"]
    r = c.post("/v1/batches", content="\n \r\n\t\n", headers=ndjson)
    assert r.status_code == 422, r.text
    assert "no requests" in r.json()["detail"]
    r = c.post("/v1/batches", content="\n" * 60000, headers=ndjson)
    assert r.status_code == 413, r.text
    assert stored(c, h) == 0


@pytest.fixture
def roomy(db_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """Body limits far above the caps on a request's content, so those caps are what answers."""
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://", PCQ_MAX_REQUEST_BYTES=4 << 20)
    with TestClient(create_app(settings)) as c:
        yield c, {"Authorization": f"Bearer {create_key_at(db_url, 'acme')}"}


MANY = {"model": "lite", "messages": [{"role": "user", "content": "x"}] * 1001}
LONG = {"model": "lite", "messages": [{"role": "user", "content": "x" * 200_000}] * 6}


@pytest.mark.parametrize(
    ("request_", "says"),
    [(MANY, "at most 1000 items"), (LONG, "at most 1000000 characters of message content")],
    ids=["messages", "characters"],
)
def test_too_many_messages_or_characters_answer_422_naming_the_field(
    roomy: tuple[TestClient, dict[str, str]], request_: dict[str, Any], says: str
) -> None:
    c, h = roomy
    r = c.post("/v1/jobs", json={"request": request_}, headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("request.messages: ")
    assert says in r.json()["detail"]
    line = json.dumps({"custom_id": "a", "body": request_})
    r = c.post("/v1/batches", content=line, headers={**h, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("line 1: body.messages: ")
    r = c.post("/v1/batches", json={"requests": [json.loads(line)]}, headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("requests[0]: body.messages: ")
    assert stored(c, h) == 0


DEEP = '{"k":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
SHALLOW = '{"k":' * (MAX_DEPTH - 3) + "1" + "}" * (MAX_DEPTH - 3)
REQ_TEXT = json.dumps(REQ)


@pytest.mark.parametrize(
    ("path", "ctype", "body", "says"),
    [
        (
            "/v1/jobs",
            "application/json",
            '{"request": ' + REQ_TEXT[:-1] + ', "x": ' + DEEP + "}}",
            "body: request: nested",
        ),
        (
            "/v1/jobs",
            "application/json",
            '{"request": ' + REQ_TEXT + ', "metadata": ' + DEEP + "}",
            "body: metadata: nested",
        ),
        (
            "/v1/jobs",
            "application/json",
            '{"request": ' + REQ_TEXT + ', "metadata": ' + "[" * 100_000,
            "body",
        ),
        (
            "/v1/batches",
            "application/x-ndjson",
            '{"custom_id": "a", "body": ' + REQ_TEXT + ', "metadata": ' + DEEP + "}",
            "line 1: metadata: nested",
        ),
        (
            "/v1/batches",
            "application/x-ndjson",
            '{"custom_id": "a", "body": ' + REQ_TEXT[:-1] + ', "x": ' + DEEP + "}}",
            "line 1: body: nested",
        ),
        (
            "/v1/batches",
            "application/json",
            '{"requests": [{"custom_id": "a", "body": ' + REQ_TEXT + ', "metadata": ' + DEEP + "}]}",
            "requests[0]: metadata: nested",
        ),
        (
            "/v1/batches",
            "application/json",
            '{"requests": [' + LINE + '], "metadata": ' + DEEP + "}",
            "body: metadata",
        ),
    ],
)
def test_nesting_deeper_than_the_limit_is_a_422_naming_the_field(
    roomy: tuple[TestClient, dict[str, str]], path: str, ctype: str, body: str, says: str
) -> None:
    c, h = roomy
    r = c.post(path, content=body, headers={**h, "Content-Type": ctype})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(says), r.json()["detail"]
    assert stored(c, h) == 0
    # ... and a little less deep is accepted.
    ok = body.replace(DEEP, SHALLOW)
    if ok != body:
        assert c.post(path, content=ok, headers={**h, "Content-Type": ctype}).status_code == 202


@pytest.mark.realservices
def test_the_api_waits_seconds_not_30_for_a_pooled_connection(pg_url: str) -> None:
    res = build_resources(make_settings(DATABASE_URL=pg_url, PCQ_BROKER_URL="memory://"))
    try:
        assert res.db_engine.pool.timeout() <= 5  # type: ignore[attr-defined]
    finally:
        res.db_engine.dispose()


@pytest.mark.realservices
def test_postgresql_sessions_end_a_transaction_left_idle(pg_url: str) -> None:
    res = build_resources(make_settings(DATABASE_URL=pg_url, PCQ_BROKER_URL="memory://"))
    try:
        with res.db_engine.connect() as conn:
            value = conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
        assert value == "1min"
    finally:
        res.db_engine.dispose()
