"""Reusing paid answers at the claim (pcq.jobs.reuse), on SQLite and PostgreSQL: which claimed
jobs take an earlier answer, which wait for an identical running call, which call; and what a
reused answer's rows are."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from api.intake import NewJob, create_batch, create_job
from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.jobs import lifecycle
from pcq.jobs.lifecycle import AttemptRecord, Claimed, Settled
from pcq.jobs.reuse import MAX_WINDOW, parse_window
from pcq.models import (
    Attempt,
    BasisField,
    BatchDomain,
    Citation,
    Job,
    Result,
    Usage,
    WebhookEvent,
    utcnow,
)
from pcq.repositories.deliveries import lock_batches_to_notify
from pcq.repositories.openai import output_page
from pcq.settings import load_settings
from pcq.tenants import create_key
from pcq.wire import BasisData, CitationData, ParsedCompletion
from tests.core.lifecycle_helpers import BatchBody

REQ = json.dumps({"model": "lite", "messages": [{"role": "user", "content": "q"}]})
OTHER = json.dumps({"model": "lite", "messages": [{"role": "user", "content": "other"}]})
DAY = 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("24h", DAY), ("7d", 7 * DAY), ("2w", 14 * DAY), ("30d", 30 * DAY)],
)
def test_a_reuse_window_is_a_whole_number_and_a_unit(text: str, seconds: int) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("24", "not a duration"),
        ("1.5h", "not a duration"),
        ("-1h", "not a duration"),
        ("24 hours", "not a duration"),
        ("", "not a duration"),
        (" 24h", "not a duration"),
        ("24h\n", "not a duration"),
        ("\u0661h", "not a duration"),  # an Arabic-Indic digit
        ("0h", "more than 0"),
        ("31d", f"at most {MAX_WINDOW.days}d"),
        ("5w", "at most 30d"),
        ("99999999999d", "not a duration"),
    ],
)
def test_anything_else_is_refused_saying_what_to_give(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_window(text)


def tenant(sessions: SessionFactory, name: str = "t") -> str:
    with unit_of_work(sessions) as s:
        t, _ = create_key(s, name, "")
        return t.id


PRICES = load_settings({}).prices


def batch(
    sessions: SessionFactory, tenant_id: str, items: list[NewJob], reuse: int | None = None
) -> list[str]:
    with unit_of_work(sessions) as s:
        stored = create_batch(
            s,
            tenant_id,
            BatchBody(
                items,
                webhook_url="https://hooks.example.com/batch",
                webhook_events='["job.succeeded"]',
                reuse_seconds=reuse,
            ),
            idempotency_key=None,
            fingerprint="f",
            prices=PRICES,
        )
        return [i for chunk in stored.id_chunks for i in chunk.split(" ")]


def job(sessions: SessionFactory, tenant_id: str, request: str = REQ, reuse: int | None = DAY) -> str:
    with unit_of_work(sessions) as s:
        j, _ = create_job(s, tenant_id, NewJob(request_json=request, model="lite", reuse_seconds=reuse), None)
        return j.id


def claim(sessions: SessionFactory, ids: list[str], now: datetime | None = None) -> Claimed:
    with unit_of_work(sessions) as s:
        return lifecycle.claim_many(
            s, ids, now=now or utcnow(), lease_seconds=60, max_attempts=3, prices=PRICES
        )


def completion() -> ParsedCompletion:
    cites = [CitationData(url=f"https://Example.com/{i}", title="t", excerpts=["e"]) for i in range(3)]
    return ParsedCompletion(
        raw_body='{"raw": true}',
        content="a",
        parsed={"k": 1},
        model="lite",
        finish_reason="stop",
        upstream_id="u",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        basis=[BasisData("output", "r", "high", cites), BasisData("other", None, None, cites[:1])],
    )


def succeed(sessions: SessionFactory, claimed: Claimed, at: datetime | None = None) -> None:
    at = at or utcnow()
    with unit_of_work(sessions) as s:
        items = [
            Settled(j, AttemptRecord(j.attempt, at, at, "ok", status_code=200), completion=completion())
            for j in claimed.jobs
        ]
        lifecycle.store_outcomes(s, items, max_attempts=3)


def fail(sessions: SessionFactory, claimed: Claimed) -> None:
    now = utcnow()
    with unit_of_work(sessions) as s:
        items = [
            Settled(j, AttemptRecord(j.attempt, now, now, "fatal", status_code=400), code="bad", error="no")
            for j in claimed.jobs
        ]
        lifecycle.store_outcomes(s, items, max_attempts=3)


def row(sessions: SessionFactory, job_id: str) -> Job:
    with sessions() as s:
        found = s.get(Job, job_id)
        assert found is not None
        s.expunge(found)
        return found


def count(sessions: SessionFactory, model: type, **where: str) -> int:
    with sessions() as s:
        q = select(func.count()).select_from(model)
        for column, value in where.items():
            q = q.where(getattr(model, column) == value)
        return int(s.scalar(q) or 0)


def test_identical_requests_in_one_claim_make_one_call_and_the_others_take_its_answer(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    a, b, c = batch(sessions, t, [NewJob(REQ, "lite", custom_id=str(i)) for i in range(3)], reuse=DAY)
    first = claim(sessions, [a, b, c])
    assert [j.id for j in first.jobs] == [a]  # the first calls
    assert sorted(first.waiting) == [b, c]
    assert first.reused == []
    waiting = row(sessions, b)
    assert (waiting.status, waiting.attempts, waiting.started_at, waiting.enqueued_at) == (
        "queued",
        0,
        None,
        None,
    )
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at > utcnow()

    # Claimed again while the call runs: they wait again.
    again = claim(sessions, [b, c], now=utcnow() + timedelta(seconds=5))
    assert again.jobs == []
    assert sorted(again.waiting) == [b, c]

    succeed(sessions, first)
    later = claim(sessions, [b, c], now=utcnow() + timedelta(seconds=10))
    assert later.jobs == []
    assert later.waiting == []
    assert sorted((j.id, origin) for j, origin in later.reused) == [(b, a), (c, a)]
    for copy in (b, c):
        done = row(sessions, copy)
        assert (done.status, done.attempts, done.error_code) == ("succeeded", 0, None)
        assert done.finished_at is not None
        assert count(sessions, Attempt, job_id=copy) == 0  # no call: nothing billed
    assert count(sessions, Attempt) == 1
    with sessions() as s:
        results = {r.job_id: r for r in s.scalars(select(Result))}
        assert results[a].reused_from is None
        for copy in (b, c):
            assert results[copy].reused_from == a
            assert (results[copy].raw_body, results[copy].content, results[copy].parsed) == (
                '{"raw": true}',
                "a",
                {"k": 1},
            )
            usage = s.get(Usage, copy)
            assert usage is not None
            assert usage.total_tokens == 3
            fields = s.scalars(
                select(BasisField).where(BasisField.job_id == copy).order_by(BasisField.position)
            )
            assert [(f.field, f.reasoning, f.confidence) for f in fields] == [
                ("output", "r", "high"),
                ("other", None, None),
            ]
            cites = list(s.scalars(select(Citation).where(Citation.job_id == copy).order_by(Citation.id)))
            original = list(s.scalars(select(Citation).where(Citation.job_id == a).order_by(Citation.id)))
            assert len(cites) == len(original) == 4
            for mine, theirs in zip(cites, original, strict=True):
                assert (mine.tenant_id, mine.batch_id) == (t, theirs.batch_id)
                same = ("field", "field_position", "position", "url", "domain", "title", "excerpts")
                assert all(getattr(mine, k) == getattr(theirs, k) for k in (*same, "confidence", "field_md5"))
                assert mine.created_at is not None
                assert mine.created_at >= theirs.created_at
        # The batch's domain counts count the copies' citations and jobs too.
        domains = s.scalars(select(BatchDomain)).all()
        assert [(d.domain, d.citations, d.jobs) for d in domains] == [("example.com", 12, 3)]
        # Each reused job's webhook event is written, as for any success, and the batch completes.
        events = s.scalars(select(WebhookEvent.type).where(WebhookEvent.job_id.in_([b, c]))).all()
        assert sorted(events) == ["job.succeeded", "job.succeeded"]
        assert s.scalar(select(func.count()).where(WebhookEvent.type == "batch.completed")) == 1


def test_a_later_job_reuses_the_calls_answer_and_points_to_the_call_not_to_a_copy(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    a = job(sessions, t)
    succeed(sessions, claim(sessions, [a]))
    b = job(sessions, t)
    assert [origin for _, origin in claim(sessions, [b]).reused] == [a]
    c = job(sessions, t, reuse=60)  # b (a copy) is the newest; its answer is a's call
    assert [origin for _, origin in claim(sessions, [c]).reused] == [a]
    assert count(sessions, Attempt) == 1


def test_no_reuse_outside_the_window_without_the_option_or_across_tenants(sessions: SessionFactory) -> None:
    t, other = tenant(sessions), tenant(sessions, "other")
    a = job(sessions, t)
    called_at = utcnow()
    succeed(sessions, claim(sessions, [a]), at=called_at)

    plain = job(sessions, t, reuse=None)
    called = claim(sessions, [plain])
    assert [j.id for j in called.jobs] == [plain]
    fail(sessions, called)  # else the jobs below would wait for its call (another test's case)
    theirs = job(sessions, other)
    assert [j.id for j in claim(sessions, [theirs]).jobs] == [theirs]
    different = job(sessions, t, request=OTHER)
    assert [j.id for j in claim(sessions, [different]).jobs] == [different]
    # Byte-identical only: the same JSON written otherwise is another request.
    spaced = job(sessions, t, request=REQ.replace(", ", ","))
    assert [j.id for j in claim(sessions, [spaced]).jobs] == [spaced]

    short = job(sessions, t, reuse=60)
    late = called_at + timedelta(seconds=61)
    assert [j.id for j in claim(sessions, [short], now=late).jobs] == [short]
    inside = job(sessions, t, reuse=60)
    assert [
        origin for _, origin in claim(sessions, [inside], now=called_at + timedelta(seconds=59)).reused
    ] == [a]


def test_a_job_waits_for_an_identical_call_claimed_elsewhere_and_calls_if_it_fails(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    a, b = job(sessions, t), job(sessions, t)
    first = claim(sessions, [a])  # another worker's claim, committed
    assert [j.id for j in first.jobs] == [a]
    assert claim(sessions, [b]).waiting == [b]
    fail(sessions, first)
    retry = claim(sessions, [b], now=utcnow() + timedelta(seconds=5))
    assert [j.id for j in retry.jobs] == [b]  # nothing to reuse, nothing running: it calls
    assert retry.jobs[0].attempt == 1  # the waits cost no attempt


def test_a_job_with_reuse_waits_for_an_identical_one_without_it_in_the_same_claim(
    sessions: SessionFactory,
) -> None:
    t = tenant(sessions)
    items = [
        NewJob(REQ, "lite", custom_id="with", reuse_seconds=DAY),
        NewJob(REQ, "lite", custom_id="without"),
    ]
    with_reuse, without = batch(sessions, t, items)
    claimed = claim(sessions, [with_reuse, without])
    assert [j.id for j in claimed.jobs] == [without]  # it calls whatever; the other waits for it
    assert claimed.waiting == [with_reuse]


def test_a_claim_that_reuses_and_a_store_take_their_locks_in_one_order(pg_url: str) -> None:
    """A store locks its batch's row (its webhook events), then upserts the batch's counts per
    domain; a claim that reuses an answer into the same batch waits for that row before it
    touches those counts (lifecycle.claim_many takes the batch rows first), so both finish, in
    turn, with the counts and the batch.completed event right."""
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    try:
        t = tenant(sessions)
        x, y, z = batch(
            sessions,
            t,
            [
                NewJob(REQ, "lite", custom_id="x", reuse_seconds=DAY),
                NewJob(OTHER, "lite", custom_id="y"),
                NewJob(REQ, "lite", custom_id="z", reuse_seconds=DAY),
            ],
        )
        first = claim(sessions, [x, y])
        assert [j.id for j in first.jobs] == [x, y]
        succeed(sessions, Claimed([j for j in first.jobs if j.id == x], []))
        store = sessions()
        store.begin()
        # The store's first lock of the batch (pcq.jobs.outbox, as store_outcomes takes it).
        batch_id = row(sessions, x).batch_id
        assert batch_id is not None
        assert lock_batches_to_notify(store, [batch_id])
        errors: list[BaseException] = []
        reused: list[Claimed] = []

        def claim_z() -> None:
            try:
                reused.append(claim(sessions, [z]))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        worker = threading.Thread(target=claim_z)
        worker.start()
        try:
            deadline = time.monotonic() + 10
            with engine.connect() as watcher:
                while not watcher.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ):
                    assert time.monotonic() < deadline, "the claim never waited for the batch row"
                    time.sleep(0.02)
            at = utcnow()
            mine = [j for j in first.jobs if j.id == y]
            done = Settled(
                mine[0], AttemptRecord(mine[0].attempt, at, at, "ok", status_code=200), completion()
            )
            lifecycle.store_outcomes(store, [done], max_attempts=3)  # the counts per domain, next
            store.commit()
        finally:
            store.close()
            worker.join(30)
        assert errors == []
        assert [(j.id, origin) for j, origin in reused[0].reused] == [(z, x)]
        with sessions() as s:
            domains = s.scalars(select(BatchDomain)).all()
            assert [(d.domain, d.citations, d.jobs) for d in domains] == [("example.com", 12, 3)]
            completed = s.scalar(select(func.count()).where(WebhookEvent.type == "batch.completed"))
            assert completed == 1
    finally:
        engine.dispose()


def test_a_reused_answer_after_a_failed_call_shows_the_answering_call_in_the_output_file(
    sessions: SessionFactory,
) -> None:
    """A job whose own call got a 500, then reused an identical job's answer: its OpenAI output
    line shows the call that made the answer (200, its request id), not the job's failed one."""
    t = tenant(sessions)
    b, a = batch(sessions, t, [NewJob(REQ, "lite", custom_id=c) for c in ("b", "a")], reuse=DAY)
    own = claim(sessions, [b])
    assert [j.id for j in own.jobs] == [b]
    now = utcnow()
    with unit_of_work(sessions) as s:
        (j,) = own.jobs
        failed = AttemptRecord(j.attempt, now, now, "retryable", status_code=500, upstream_request_id="req-b")
        lifecycle.store_outcomes(
            s, [Settled(j, failed, retry_at=now, code="http_500", error="e")], max_attempts=3
        )
    called = claim(sessions, [a])
    with unit_of_work(sessions) as s:
        (j,) = called.jobs
        ok = AttemptRecord(j.attempt, now, now, "ok", status_code=200, upstream_request_id="req-a")
        lifecycle.store_outcomes(s, [Settled(j, ok, completion=completion())], max_attempts=3)
    assert [
        (j.id, origin) for j, origin in claim(sessions, [b], now=utcnow() + timedelta(seconds=5)).reused
    ] == [(b, a)]
    batch_id = row(sessions, b).batch_id
    assert batch_id is not None
    with sessions() as s:
        lines = {o.id: o for o in output_page(s, batch_id, ["succeeded"], after="", limit=10)}
    assert (lines[b].status_code, lines[b].request_id) == (200, "req-a")
    assert (lines[a].status_code, lines[a].request_id) == (200, "req-a")
    assert row(sessions, b).attempts == 1  # its failed call is its own, and paid for
