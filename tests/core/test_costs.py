"""pcq.costs: which calls are billed, and what one costs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import event, select

from api.intake import NewJob, create_batch, create_job
from pcq import costs
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import lifecycle, outbox
from pcq.jobs.lifecycle import AttemptRecord, Claimed, Settled
from pcq.models import Job, JobStatus, WebhookEvent, utcnow
from pcq.settings import load_settings
from pcq.tenants import create_key
from pcq.wire import ParsedCompletion
from tests.core.lifecycle_helpers import BatchBody

PRICES = load_settings({}).prices
REQ = json.dumps({"model": "lite", "messages": [{"role": "user", "content": "q"}]})
DAY = 86400


@pytest.mark.parametrize(
    ("status", "billed"),
    [
        (200, True),
        (400, True),  # no documented rule: counted, the safe side for a budget
        (500, True),
        (503, True),
        (401, False),  # the key refused: no work done
        (403, False),
        (429, False),  # rate limited: throttling must not spend a budget
        (None, False),  # no answer at all (a timeout, a refused connection)
    ],
)
def test_which_calls_are_billed(status: int | None, billed: bool) -> None:
    assert costs.billed(status) is billed
    expected = costs.call_price(PRICES, "base") if billed else 0.0
    assert costs.attempt_cost(PRICES, "base", status, None) == expected


def test_the_default_prices_are_parallels_per_1000_requests() -> None:
    assert {m: costs.call_price(PRICES, m) * 1000 for m in ("speed", "lite", "base", "core")} == {
        "speed": 5,
        "lite": 5,
        "base": 10,
        "core": 25,
    }


# --- budgets at the claim, on SQLite and PostgreSQL


def tenant(sessions: SessionFactory) -> str:
    with unit_of_work(sessions) as s:
        t, _ = create_key(s, "t", "")
        return t.id


def batch(
    sessions: SessionFactory,
    tenant_id: str,
    items: list[NewJob],
    max_cost: float | None,
    reuse: int | None = None,
) -> list[str]:
    lines = BatchBody(
        items,
        webhook_url="https://hooks.example.com/batch",
        webhook_events='["job.cancelled"]',
        max_cost=max_cost,
        reuse_seconds=reuse,
    )
    with unit_of_work(sessions) as s:
        stored = create_batch(s, tenant_id, lines, idempotency_key=None, fingerprint="f", prices=PRICES)
        return [i for chunk in stored.id_chunks for i in chunk.split(" ")]


def request(text: str) -> str:
    return json.dumps({"model": "lite", "messages": [{"role": "user", "content": text}]})


def answered(sessions: SessionFactory, tenant_id: str, text: str) -> str:
    """A job of ``text`` that called and succeeded (outside any budget): an answer to reuse."""
    with unit_of_work(sessions) as s:
        j, _ = create_job(s, tenant_id, NewJob(request(text), "lite", reuse_seconds=DAY), None)
    claimed = claim(sessions, [j.id])
    at = utcnow()
    ok = ParsedCompletion('{"raw": true}', "a", None, "lite", "stop", "u", None)
    with unit_of_work(sessions) as s:
        items = [
            Settled(c, AttemptRecord(c.attempt, at, at, "ok", status_code=200), completion=ok)
            for c in claimed.jobs
        ]
        lifecycle.store_outcomes(s, items, max_attempts=3)
    return j.id


def claim(sessions: SessionFactory, ids: list[str]) -> Claimed:
    with unit_of_work(sessions) as s:
        return lifecycle.claim_many(s, ids, now=utcnow(), lease_seconds=60, max_attempts=3, prices=PRICES)


def statuses(sessions: SessionFactory, ids: list[str]) -> dict[str, str]:
    with sessions() as s:
        return {j.id: j.status for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def test_an_exhausted_budget_is_cancelled_a_chunk_per_claim_in_bounded_statements(
    sessions: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scope far larger than a statement's bound parameters (a 100k-job batch) must not jam
    its claims: each claim cancels at most CANCEL_AT_ONCE queued jobs, and writes their events
    EVENTS_AT_ONCE jobs per statement; the next claim of one of the rest cancels the next ones."""
    monkeypatch.setattr(costs, "CANCEL_AT_ONCE", 4)
    monkeypatch.setattr(outbox, "EVENTS_AT_ONCE", 3)
    t = tenant(sessions)
    ids = batch(sessions, t, [NewJob(REQ, "lite", custom_id=str(i)) for i in range(10)], max_cost=0.0)
    known = set(ids)
    bound: list[int] = []  # job ids bound by each statement of the claims

    def count_ids(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        for row in params if many else [params]:
            values = row.values() if isinstance(row, dict) else row
            bound.append(sum(1 for v in values if v in known))

    def claim_counting(job_id: str) -> Claimed:
        engine = sessions.kw["bind"]
        event.listen(engine, "before_cursor_execute", count_ids)
        try:
            return claim(sessions, [job_id])
        finally:
            event.remove(engine, "before_cursor_execute", count_ids)

    assert claim_counting(ids[0]).jobs == []
    ended = [i for i, status in statuses(sessions, ids).items() if status == JobStatus.CANCELLED]
    assert len(ended) == 1 + 4  # the claimed job, and one chunk of the queued ones
    rest = sorted(known - set(ended))
    assert claim_counting(rest[0]).jobs == []  # one of the rest: refused, and the next chunk cancelled
    assert max(bound) <= 3
    assert set(statuses(sessions, ids).values()) == {JobStatus.CANCELLED}
    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(ids))).all()
        assert {(j.error_code, j.attempts) for j in jobs} == {(costs.BUDGET_EXCEEDED, 0)}
        events = s.scalars(select(WebhookEvent.type)).all()
        assert sorted(events) == ["batch.completed"] + ["job.cancelled"] * 10


def test_jobs_that_reuse_or_wait_in_the_claim_are_no_calls_in_flight(sessions: SessionFactory) -> None:
    """Room for exactly two calls, and a claim of two calling jobs beside three that wait for
    them and two that reuse an earlier answer: all are ``running`` while the claim decides, but
    only the two calls count against the budget, and both are made."""
    t = tenant(sessions)
    earlier = answered(sessions, t, "c")
    texts = ["a", "a", "a", "b", "b", "c", "c"]
    two_calls = 2 * costs.call_price(PRICES, "lite")
    ids = batch(
        sessions,
        t,
        [NewJob(request(x), "lite", custom_id=str(i)) for i, x in enumerate(texts)],
        two_calls,
        DAY,
    )
    claimed = claim(sessions, ids)
    assert [j.id for j in claimed.jobs] == [ids[0], ids[3]]
    assert sorted(claimed.waiting) == sorted([ids[1], ids[2], ids[4]])
    assert [(j.id, origin) for j, origin in claimed.reused] == [(ids[5], earlier), (ids[6], earlier)]
    assert JobStatus.CANCELLED not in statuses(sessions, ids).values()
