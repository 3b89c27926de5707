"""Signed webhooks, end to end: real API, worker and mock upstream processes; a receiver on
127.0.0.1 that verifies every delivery with the ``standardwebhooks`` package, as a user's would.

The stack runs with ``PCQ_WEBHOOK_ALLOW_PRIVATE=true`` (the receiver is on loopback) and a short
retry schedule, except the SSRF test, which runs with the guard on, as shipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from standardwebhooks import Webhook

from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.models import Job
from pcq.tenants import create_key_at
from tests.e2e.test_verbatim import wait_job
from tests.stack import Stack, stack_env
from tests.webhook_receiver import HANG, Receiver

pytestmark = [pytest.mark.e2e]

REQUEST = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}
WEBHOOK_ENV = {
    "PCQ_WEBHOOK_ALLOW_PRIVATE": "true",
    "PCQ_WEBHOOK_RETRY_SCHEDULE": "0.3,0.6,1,2",
    "PCQ_WEBHOOK_TIMEOUT_SECONDS": "2",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def start(tmp_path: Path, db: str, redis_url: str | None, **env: str) -> Stack:
    s = Stack({**stack_env(db, redis_url), **env}, tmp_path)
    s.start_mock()
    s.start_api()
    s.start_worker()
    return s


@pytest.fixture
def stack(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    s = start(tmp_path, pg_url, redis_url, **WEBHOOK_ENV)
    try:
        yield s, pg_url
    finally:
        s.stop_all()


def api(s: Stack, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{s.api_url}{path}", headers={"x-api-key": key}, timeout=30, **kw)


def verified(secret: str, got: Any) -> dict[str, Any]:
    """The event, verified as a Standard Webhooks receiver verifies it (raises if not)."""
    payload: dict[str, Any] = Webhook(secret).verify(got.body, got.headers)
    return payload


def deliveries(s: Stack, key: str, **params: str) -> list[dict[str, Any]]:
    r = api(s, key, "GET", "/v1/webhooks/deliveries", params=params)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_a_receiver_that_fails_twice_gets_each_event_three_times_with_one_id(
    stack: tuple[Stack, str], receiver: Receiver
) -> None:
    s, db = stack
    key = create_key_at(db, "hooks")
    secret = api(s, key, "GET", "/v1/webhooks/secret").json()["secret"]
    receiver.script["/flaky"] = [500, 500]
    r = api(s, key, "POST", "/v1/jobs", json={"request": REQUEST, "webhook_url": receiver.url("/flaky")})
    assert r.status_code == 202, r.text
    job = wait_job(s, key, r.json()["id"])
    got = receiver.wait("/flaky", 3)
    time.sleep(0.5)
    assert len(receiver.at("/flaky")) == 3  # delivered on the third: no fourth
    events = [verified(secret, g) for g in got]
    assert {g.headers["webhook-id"] for g in got} == {got[0].headers["webhook-id"]}
    assert len({g.body for g in got}) == 1  # the same bytes every time
    event = events[0]
    assert event["type"] == "job.succeeded"
    assert event["data"] == job  # the job as GET /v1/jobs/{id} shows it, result included
    # The retry schedule: the second try about 0.3 s after the first failure (±10%).
    assert 0.25 <= got[1].at - got[0].at <= 1.5
    [d] = deliveries(s, key, job_id=job["id"])
    assert d["id"] == got[0].headers["webhook-id"]
    assert d["status"] == "delivered"
    assert d["type"] == "job.succeeded"
    assert d["url"] == receiver.url("/flaky")
    assert [a["status_code"] for a in d["attempts"]] == [500, 500, 200]
    assert [a["error"] for a in d["attempts"]] == ["http_500", "http_500", None]

    # Redeliver: one more attempt, the same id, verified again.
    assert api(s, key, "POST", f"/v1/webhooks/deliveries/{d['id']}/redeliver").status_code == 202
    again = receiver.wait("/flaky", 4)[3]
    assert again.headers["webhook-id"] == d["id"]
    assert verified(secret, again) == event
    # Another tenant sees none of it.
    other = create_key_at(db, "someone-else")
    assert deliveries(s, other) == []
    assert api(s, other, "POST", f"/v1/webhooks/deliveries/{d['id']}/redeliver").status_code == 404


def test_a_batch_sends_the_job_events_it_asked_for_and_batch_completed_once(
    stack: tuple[Stack, str], receiver: Receiver
) -> None:
    s, db = stack
    key = create_key_at(db, "batch-hooks")
    secret = api(s, key, "GET", "/v1/webhooks/secret").json()["secret"]
    bad = {"model": "lite", "messages": [{"role": "user", "content": "[[mock:status=400]]"}]}
    body = {
        "requests": [
            {"custom_id": "ok-1", "body": REQUEST},
            {"custom_id": "ok-2", "body": REQUEST},
            {"custom_id": "bad", "body": bad},
        ],
        "webhook_url": receiver.url("/batch"),
        "webhook_events": ["job.failed"],
    }
    r = api(s, key, "POST", "/v1/batches", json=body)
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    assert r.json()["webhook_events"] == ["job.failed"]
    receiver.wait("/batch", 2)
    time.sleep(1)  # anything more (a second batch.completed, an event not asked for) lands too
    events = [verified(secret, g) for g in receiver.at("/batch")]
    assert sorted(e["type"] for e in events) == ["batch.completed", "job.failed"]
    completed = next(e for e in events if e["type"] == "batch.completed")
    shown = api(s, key, "GET", f"/v1/batches/{batch_id}").json()
    assert completed["data"] == shown
    assert completed["data"]["counts"]["succeeded"] == 2
    failed = next(e for e in events if e["type"] == "job.failed")
    assert failed["data"]["custom_id"] == "bad"


def test_a_rotated_secret_and_the_old_one_both_verify_during_the_grace_period(
    stack: tuple[Stack, str], receiver: Receiver
) -> None:
    s, db = stack
    key = create_key_at(db, "rotate")
    old = api(s, key, "GET", "/v1/webhooks/secret").json()["secret"]
    new = api(s, key, "POST", "/v1/webhooks/secret/rotate").json()["secret"]
    assert new != old
    r = api(s, key, "POST", "/v1/jobs", json={"request": REQUEST, "webhook_url": receiver.url("/rot")})
    assert r.status_code == 202, r.text
    [got] = receiver.wait("/rot", 1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert verified(old, got) == verified(new, got)


def test_a_worker_killed_mid_delivery_leaves_it_to_another(
    stack: tuple[Stack, str], receiver: Receiver
) -> None:
    """The first attempt hangs on the receiver; its worker is killed. The event's lease (twice
    the 2 s timeout, plus 5 s) expires and the second worker delivers it: at least once."""
    s, db = stack
    key = create_key_at(db, "crash")
    receiver.script["/slow"] = [HANG]
    r = api(s, key, "POST", "/v1/jobs", json={"request": REQUEST, "webhook_url": receiver.url("/slow")})
    assert r.status_code == 202, r.text
    receiver.wait("/slow", 1)
    s.procs["worker"].kill()
    s.procs["worker"].wait()
    s.start_worker("worker-2")
    got = receiver.wait("/slow", 2, timeout=30)
    assert got[1].headers["webhook-id"] == got[0].headers["webhook-id"]
    deadline = time.monotonic() + 10
    while (d := deliveries(s, key)[0])["status"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d["status"] == "delivered"
    assert [a["status_code"] for a in d["attempts"]] == [200]  # the killed attempt left no row


def test_a_name_that_resolves_to_loopback_is_refused_at_delivery(
    pg_url: str, redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """With the guard on (as shipped), ``localhost`` is refused at submission; a job whose URL
    got in anyway (its name resolved elsewhere then: DNS rebinding) is refused at delivery, and
    the receiver on 127.0.0.1 gets no connection."""
    s = start(tmp_path, pg_url, redis_url, PCQ_WEBHOOK_RETRY_SCHEDULE="0.2", PCQ_WEBHOOK_TIMEOUT_SECONDS="2")
    try:
        key = create_key_at(pg_url, "ssrf")
        url = f"http://localhost:{receiver.port}/internal"
        refused = api(s, key, "POST", "/v1/jobs", json={"request": REQUEST, "webhook_url": url})
        assert refused.status_code == 422, refused.text
        slow = {"model": "lite", "messages": [{"role": "user", "content": "q [[mock:latency_ms=2000]]"}]}
        r = api(s, key, "POST", "/v1/jobs", json={"request": slow})
        assert r.status_code == 202, r.text
        engine = make_engine(pg_url)
        with unit_of_work(make_session_factory(engine)) as session:  # as if it had passed then
            session.execute(update(Job).where(Job.id == r.json()["id"]).values(webhook_url=url))
        engine.dispose()
        wait_job(s, key, r.json()["id"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            [d] = deliveries(s, key) or [{"status": "none"}]
            if d["status"] == "failed":
                break
            time.sleep(0.2)
        assert d["status"] == "failed"
        assert {a["error"] for a in d["attempts"]} == {"ssrf_refused"}
        assert all(a["status_code"] is None for a in d["attempts"])
        assert receiver.requests == []
    finally:
        s.stop_all()
