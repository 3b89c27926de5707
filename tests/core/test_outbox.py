"""The webhook outbox, decided (pcq.jobs.outbox): which events a job's end writes, in its own
transaction; batch.completed exactly once, even when two writers end a batch's last jobs at
once; the body every attempt sends; what an attempt's outcome does (the retry schedule,
Retry-After, 410, redeliver). Through the production paths: the worker's store_outcomes, the
API's cancel and retry. The sending itself is tests/e2e/test_webhooks.py."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from api import control
from api.intake import NewJob, create_batch, create_job
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import outbox
from pcq.jobs.outbox import AttemptOutcome
from pcq.models import DeliveryStatus, Job, WebhookAttempt, WebhookEvent, utcnow
from pcq.repositories import jobs as job_rows
from pcq.repositories.results import answers_of
from pcq.settings import default_prices
from pcq.tenants import create_key
from pcq.views import job_out, results_out
from tests.core import lifecycle_helpers as one
from tests.core.lifecycle_helpers import BatchBody
from tests.core.test_lifecycle import _completion, _record

REQ = json.dumps({"model": "lite", "messages": [{"role": "user", "content": "q"}]})
HOOK = "https://hooks.example.com/pcq"
SCHEDULE = [5.0, 300.0, 1800.0]


def tenant(sessions: SessionFactory, name: str = "t") -> str:
    with unit_of_work(sessions) as s:
        t, _ = create_key(s, name, "")
        return t.id


def single_job(sessions: SessionFactory, tenant_id: str, url: str | None = HOOK) -> str:
    with unit_of_work(sessions) as s:
        job, _ = create_job(s, tenant_id, NewJob(request_json=REQ, model="lite", webhook_url=url), None)
        return job.id


def batch(sessions: SessionFactory, tenant_id: str, n: int, *, events: list[str] | None = None) -> list[str]:
    items = [NewJob(request_json=REQ, model="lite", custom_id=f"c{i}") for i in range(n)]
    body = BatchBody(items, webhook_url=HOOK, webhook_events=json.dumps(events) if events else None)
    with unit_of_work(sessions) as s:
        stored = create_batch(
            s, tenant_id, body, idempotency_key=None, fingerprint="f", prices=default_prices()
        )
        return [i for chunk in stored.id_chunks for i in chunk.split(" ")]


def succeed(sessions: SessionFactory, job_id: str) -> None:
    with unit_of_work(sessions) as s:
        job = one.claim(s, job_id, now=utcnow(), lease_seconds=60, max_attempts=3)
        assert job is not None
        assert one.store_success(s, job, _record(job.attempt), _completion())


def fail(sessions: SessionFactory, job_id: str) -> None:
    with unit_of_work(sessions) as s:
        job = one.claim(s, job_id, now=utcnow(), lease_seconds=60, max_attempts=3)
        assert job is not None
        one.store_failure(s, job, _record(job.attempt), code="bad_request", error="no")


def events(sessions: SessionFactory) -> list[WebhookEvent]:
    with sessions() as s:
        return list(s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


def kinds(sessions: SessionFactory) -> list[tuple[str, str | None, str]]:
    return [(e.type, e.job_id, e.url) for e in events(sessions)]


def test_a_job_with_a_webhook_url_writes_its_event_with_its_status(sessions: SessionFactory) -> None:
    t = tenant(sessions)
    ok_id, bad_id, still_queued, cancelled = (single_job(sessions, t) for _ in range(4))
    no_url = single_job(sessions, t, url=None)
    succeed(sessions, ok_id)
    fail(sessions, bad_id)
    succeed(sessions, no_url)
    with unit_of_work(sessions) as s:
        job = job_rows.get(s, t, cancelled)
        assert job is not None
        control.cancel(s, job)
    assert sorted(kinds(sessions)) == sorted(
        [("job.succeeded", ok_id, HOOK), ("job.failed", bad_id, HOOK), ("job.cancelled", cancelled, HOOK)]
    )
    assert still_queued not in {e.job_id for e in events(sessions)}
    assert all(e.status == DeliveryStatus.PENDING and e.body is None for e in events(sessions))


def test_batch_completed_is_written_once_when_the_last_job_ends_and_again_after_a_retry(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    a, b, c = batch(sessions, t, 3, events=["job.failed"])
    succeed(sessions, a)
    fail(sessions, b)
    assert [k for k, _, _ in kinds(sessions)] == ["job.failed"]  # only the kind the batch asked for
    succeed(sessions, c)
    assert [k for k, _, _ in kinds(sessions)] == ["job.failed", "batch.completed"]
    with unit_of_work(sessions) as s:
        job = job_rows.get(s, t, b)
        assert job is not None
        assert job.batch_id is not None
        control.retry_failed(s, job.batch_id)
    succeed(sessions, b)
    assert [k for k, _, _ in kinds(sessions)] == ["job.failed", "batch.completed", "batch.completed"]


def test_two_writers_ending_a_batch_at_once_write_batch_completed_exactly_once(
    sessions: SessionFactory, db_url: str
) -> None:
    """Each writer ends one of the last two jobs in its own transaction, the first holding its
    transaction open while the second writes: the second waits on the batch row, then sees the
    first's job ended, and writes the event; the first, which looked first, did not."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: no two transactions overlap")
    t = tenant(sessions)
    a, b = batch(sessions, t, 2)
    with unit_of_work(sessions) as s:
        ja = one.claim(s, a, now=utcnow(), lease_seconds=60, max_attempts=3)
        jb = one.claim(s, b, now=utcnow(), lease_seconds=60, max_attempts=3)
    assert ja is not None
    assert jb is not None
    looked = threading.Event()

    def writer_a() -> None:
        with unit_of_work(sessions) as s:
            one.store_success(s, ja, _record(ja.attempt), _completion())
            looked.set()
            time.sleep(0.5)  # still uncommitted while B writes

    thread = threading.Thread(target=writer_a)
    thread.start()
    assert looked.wait(10)
    with unit_of_work(sessions) as s:
        one.store_success(s, jb, _record(jb.attempt), _completion())
    thread.join()
    assert [k for k, _, _ in kinds(sessions)] == ["batch.completed"]


def take(sessions: SessionFactory, *, max_inline: int = 262144, now=None):
    with unit_of_work(sessions) as s:
        return outbox.take_due(
            s,
            now=now or utcnow(),
            lease_seconds=45,
            limit=100,
            max_inline_bytes=max_inline,
            api_url="https://pcq.example.com/",
        )


def test_the_body_is_the_job_as_the_api_shows_it_and_fixed_at_the_first_attempt(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    job_id = single_job(sessions, t)
    succeed(sessions, job_id)
    [d] = take(sessions)
    body = json.loads(d.body)
    assert list(body) == ["type", "timestamp", "data"]
    assert body["type"] == "job.succeeded"
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        shown = job_out(job, results_out(answers_of(s, [job_id])).get(job_id)).model_dump(mode="json")
    assert body["data"] == shown
    assert body["data"]["result"]["basis"][0]["citations"][0]["url"] == "https://Example.com/0"
    assert d.secrets
    assert d.secrets[0].startswith("whsec_")
    # The lease holds it; once it expires, the same bytes go again.
    assert take(sessions) == []
    [again] = take(sessions, now=utcnow() + timedelta(seconds=60))
    assert again.body == d.body
    assert again.id == d.id


def test_a_job_larger_than_the_inline_limit_carries_a_result_url(sessions: SessionFactory) -> None:
    t = tenant(sessions)
    job_id = single_job(sessions, t)
    succeed(sessions, job_id)
    [d] = take(sessions, max_inline=200)
    data = json.loads(d.body)["data"]
    assert "result" not in data
    assert data["result_url"] == f"https://pcq.example.com/v1/jobs/{job_id}"
    assert data["id"] == job_id
    assert data["status"] == "succeeded"


def outcome(code: int | None, error: str | None = None, retry_after: float | None = None) -> AttemptOutcome:
    return AttemptOutcome(utcnow(), code, 12, error, "x" * 5000, retry_after)


def settle(sessions: SessionFactory, d, result: AttemptOutcome) -> str:
    with unit_of_work(sessions) as s:
        return outbox.settle(s, d, result, schedule=SCHEDULE)


def test_failures_follow_the_schedule_from_the_first_failure_then_fail(sessions: SessionFactory) -> None:
    t = tenant(sessions)
    succeed(sessions, single_job(sessions, t))
    [d] = take(sessions)
    first_at = utcnow()
    assert settle(sessions, d, outcome(500)) == DeliveryStatus.PENDING
    [e] = events(sessions)
    assert e.failures == 1
    assert e.lease_until is None
    assert abs((e.next_attempt_at - e.first_failed_at).total_seconds() - 5) <= 0.5 + 0.01  # 5 s ± 10%
    assert (e.first_failed_at - first_at).total_seconds() < 5
    for n, delay in enumerate(SCHEDULE[1:], start=2):
        [d] = take(sessions, now=e.next_attempt_at + timedelta(seconds=1))
        settle(sessions, d, outcome(None, "timeout"))
        [e] = events(sessions)
        assert e.failures == n
        assert abs((e.next_attempt_at - e.first_failed_at).total_seconds() - delay) <= delay * 0.1 + 0.01
    [d] = take(sessions, now=e.next_attempt_at + timedelta(seconds=1))
    assert settle(sessions, d, outcome(503)) == DeliveryStatus.FAILED
    with sessions() as s:
        attempts = list(s.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)))
    assert [(a.status_code, a.error) for a in attempts] == [
        (500, "http_500"),
        (None, "timeout"),
        (None, "timeout"),
        (503, "http_503"),
    ]
    assert all(len(a.response or "") == 1024 for a in attempts)  # at most 1 KiB kept


def test_retry_after_on_a_429_is_honoured_and_a_2xx_delivers(sessions: SessionFactory) -> None:
    t = tenant(sessions)
    succeed(sessions, single_job(sessions, t))
    [d] = take(sessions)
    settle(sessions, d, outcome(429, retry_after=600))
    [e] = events(sessions)
    assert (e.next_attempt_at - utcnow()).total_seconds() > 590  # not the schedule's 5 s
    [d] = take(sessions, now=e.next_attempt_at)
    assert settle(sessions, d, outcome(204)) == DeliveryStatus.DELIVERED
    [e] = events(sessions)
    assert e.delivered_at is not None


def test_a_410_disables_the_url_for_the_tenant_until_a_redelivery(sessions: SessionFactory) -> None:
    t = tenant(sessions)
    first, second = single_job(sessions, t), single_job(sessions, t)
    other_tenant = tenant(sessions, "other")
    theirs = single_job(sessions, other_tenant)
    succeed(sessions, first)
    [d] = take(sessions)
    assert settle(sessions, d, outcome(410)) == DeliveryStatus.DISABLED
    succeed(sessions, second)
    succeed(sessions, theirs)
    [d] = take(sessions)  # the other tenant's event to the same URL still goes
    assert d.tenant_id == other_tenant
    by_job = {e.job_id: e for e in events(sessions)}
    assert by_job[second].status == DeliveryStatus.DISABLED  # not sent: no attempt
    with unit_of_work(sessions) as s:
        outbox.redeliver(s, by_job[second], now=utcnow())
    [d] = take(sessions)
    assert d.id == by_job[second].id


def test_an_attempt_stored_after_a_redelivery_took_its_event_does_not_move_it(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    succeed(sessions, single_job(sessions, t))
    [d] = take(sessions)
    [e] = events(sessions)
    with unit_of_work(sessions) as s:
        outbox.redeliver(s, e, now=utcnow())
    # the old attempt ends: recorded, but the event stays due now
    assert settle(sessions, d, outcome(500)) == "superseded"
    [e] = events(sessions)
    assert e.status == DeliveryStatus.PENDING
    assert e.failures == 0
    assert len(take(sessions)) == 1
