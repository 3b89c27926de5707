"""pcq.costs: which calls are billed, and what one costs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, select

from api.intake import NewJob, create_batch
from pcq import costs
from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.jobs import lifecycle, outbox
from pcq.jobs.lifecycle import Claimed
from pcq.models import Job, JobStatus, Priority, WebhookEvent, utcnow
from pcq.settings import load_settings
from pcq.tenants import create_key

PRICES = load_settings({}).prices
REQ = json.dumps({"model": "lite", "messages": [{"role": "user", "content": "q"}]})


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


@pytest.fixture
def sessions(db_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@dataclass
class Lines:
    """A batch body (api.intake.BatchSource) of NewJob items, with a max_cost."""

    items: list[NewJob]
    max_cost: float | None
    webhook_url: str | None = "https://hooks.example.com/batch"
    webhook_events: str | None = '["job.cancelled"]'
    metadata_json: str | None = None
    priority: Priority | None = None
    reuse_seconds: int | None = None

    def jobs(self) -> Iterator[NewJob]:
        yield from self.items


def tenant(sessions: SessionFactory) -> str:
    with unit_of_work(sessions) as s:
        t, _ = create_key(s, "t", "")
        return t.id


def batch(sessions: SessionFactory, tenant_id: str, items: list[NewJob], max_cost: float | None) -> list[str]:
    with unit_of_work(sessions) as s:
        stored = create_batch(
            s, tenant_id, Lines(items, max_cost), idempotency_key=None, fingerprint="f", prices=PRICES
        )
        return [i for chunk in stored.id_chunks for i in chunk.split(" ")]


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
