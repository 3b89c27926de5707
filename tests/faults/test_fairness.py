"""One quota, fairly shared, on real processes: the API, workers, the mock upstream, PostgreSQL
and a private redis-server, with the quota set low so a small backlog takes a minute.

Checked: another tenant's single job, and the same tenant's ``high`` batch, run long before a
backlog ahead of them drains; ``max_share`` holds a tenant to its fraction of the quota while
another tenant takes the rest; a dispatcher killed with ``kill -9`` mid-backlog is replaced
by another worker's, and every job ends with one stored result.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from pcq.models import Job
from pcq.models import Tenant as TenantRow
from tests.faults.helpers import (
    Db,
    PrivateRedis,
    Tenant,
    chat,
    check_invariants,
    kill_group,
    start_stack,
    wait_for,
    wait_worker_ready,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]

# About 2 calls a second (window-safe 117/min), and a broker that holds 2 s of them.
SLOW_QUOTA = {
    "PCQ_RATE_LIMIT_PER_MINUTE": "120",
    "PCQ_RATE_LIMIT_BURST": "1",
    "PCQ_ADMISSION_HORIZON_SECONDS": "2",
}


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, private_redis: PrivateRedis) -> Iterator[Stack]:
    s = start_stack(tmp_path, pg_url, private_redis.url, "--latency-ms", "50", **SLOW_QUOTA)
    try:
        wait_worker_ready(s)
        yield s
    finally:
        s.stop_all()


def _counts(db: Db, batch_id: str) -> dict[str, int]:
    def read(s: object) -> dict[str, int]:
        rows = s.execute(  # type: ignore[attr-defined]
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
        return {status: n for status, n in rows}

    return db._read(read)  # type: ignore[arg-type]


def _batch(tenant: Tenant, n: int, prefix: str, **params: str) -> tuple[str, list[str]]:
    """A JSONL batch of ``n`` chats, told apart by ``prefix``: (batch id, job ids)."""
    return tenant.submit_batch([chat(f"{prefix} {i}") for i in range(n)], **params)


@pytest.mark.timeout(120)
def test_a_single_job_and_an_urgent_batch_do_not_wait_for_a_backlog(
    stack: Stack, pg_url: str, db: Db
) -> None:
    a = Tenant.create(stack, pg_url, "tenant-a")
    b = Tenant.create(stack, pg_url, "tenant-b")
    backlog, _ = _batch(a, 120, "bulk")  # a minute of quota
    time.sleep(3)
    submitted = time.monotonic()
    r = b.submit_job(chat("just one"))
    assert r.status_code == 202, r.text
    single = r.json()["id"]
    _, urgent = _batch(a, 4, "urgent", priority="high")
    _, later = _batch(a, 4, "later")  # normal, like the backlog, and submitted after the urgent

    done = db.wait_terminal([single, *urgent], timeout=20, stack=stack)
    took = time.monotonic() - submitted
    left = _counts(db, backlog).get("queued", 0)
    assert all(j.status == "succeeded" and j.attempts == 1 for j in done.values()), done
    # First come, first served would run them after the whole backlog (about a minute).
    assert took < 12, took
    assert left >= 80, f"only {left} of the backlog's 120 jobs were still queued"
    # Within tenant A, high goes first: no job of the later normal batch started before the
    # last urgent one.
    db.wait_terminal(later, timeout=20, stack=stack)
    started = _started(db, [*urgent, *later])
    assert max(started[i] for i in urgent) <= min(started[i] for i in later), started


def _started(db: Db, ids: list[str]) -> dict[str, datetime]:
    def read(s: object) -> dict[str, datetime]:
        rows = s.execute(select(Job.id, Job.started_at).where(Job.id.in_(ids))).all()  # type: ignore[attr-defined]
        return {i: at for i, at in rows}

    return db._read(read)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_max_share_holds_a_tenant_to_its_fraction_while_another_takes_the_rest(
    stack: Stack, pg_url: str, db: Db
) -> None:
    capped = Tenant.create(stack, pg_url, "capped")
    other = Tenant.create(stack, pg_url, "other")
    with db.engine.begin() as conn:  # what `pcq tenants set capped --max-share 0.25` writes
        conn.execute(update(TenantRow).where(TenantRow.name == "capped").values(max_share=0.25))
    capped_batch, _ = _batch(capped, 60, "c")
    window = 15.0
    time.sleep(window)
    started_alone = sum(n for s, n in _counts(db, capped_batch).items() if s != "queued")
    # 0.25 of ~1.95 calls/s for 15 s, plus the bucket it starts with (2 s of its rate), plus
    # what was in flight: far below the ~30 it would take uncapped.
    assert 5 <= started_alone <= 0.25 * 1.95 * window + 0.25 * 1.95 * 2 + 3, started_alone

    other_batch, _ = _batch(other, 60, "o")
    before = sum(n for s, n in _counts(db, capped_batch).items() if s != "queued")
    time.sleep(window)
    capped_more = sum(n for s, n in _counts(db, capped_batch).items() if s != "queued") - before
    others = sum(n for s, n in _counts(db, other_batch).items() if s != "queued")
    assert capped_more <= 0.25 * 1.95 * window + 3, capped_more
    assert others >= 1.95 * window * 0.6, others  # the rest of the quota is the other tenant's


@pytest.mark.timeout(150)
def test_a_killed_dispatcher_is_replaced_and_no_job_is_lost_or_stored_twice(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(
        tmp_path,
        pg_url,
        private_redis.url,
        "--latency-ms",
        "300",
        PCQ_RATE_LIMIT_PER_MINUTE="600",
        PCQ_ADMISSION_HORIZON_SECONDS="2",
    )
    try:
        stack.start_worker("worker2")
        wait_worker_ready(stack)
        wait_worker_ready(stack, "worker2")
        tenant = Tenant.create(stack, pg_url)
        _, ids = _batch(tenant, 200, "k")  # 20 s at 600/min
        lease = f"pcq:dispatcher:{stack.env['PCQ_QUEUE_NAME']}"

        def leader() -> int | None:
            value = private_redis.client().get(lease)
            return int(value.split(b":")[0]) if value else None

        pids = {stack.procs[n].pid: n for n in ("worker", "worker2")}
        first = wait_for("a dispatcher", leader, timeout=10)
        wait_for(
            "some jobs done", lambda: sum(j.status == "succeeded" for j in db.jobs(ids).values()) >= 30, 30
        )
        kill_group(stack.procs[_owner(pids, first)])
        second = wait_for("another dispatcher", lambda: (p := leader()) is not None and p != first and p, 15)
        assert second != first
        assert _owner(pids, second) != _owner(pids, first)
        db.wait_terminal(ids, timeout=90, stack=stack)
    finally:
        stack.stop_all()
    rep = check_invariants(db, ids)
    assert rep.by_status == {"succeeded": len(ids)}, rep.by_status


def _owner(pids: dict[int, str], pid: int) -> str:
    """The stack's name of the worker whose process (or a child of it) is ``pid``."""
    if pid in pids:
        return pids[pid]
    parent = int(Path(f"/proc/{pid}/stat").read_text().split()[3])
    assert parent in pids, (pid, parent, os.getpid())
    return pids[parent]


@pytest.mark.timeout(90)
def test_a_single_job_skips_the_dispatcher_only_while_nothing_waits(
    stack: Stack, pg_url: str, db: Db, private_redis: PrivateRedis
) -> None:
    flag = f"pcq:dispatch:open:{stack.env['PCQ_QUEUE_NAME']}"
    wait_for("the dispatcher to say it is open", lambda: private_redis.client().exists(flag), timeout=10)
    tenant = Tenant.create(stack, pg_url)

    def sent_by_the_api() -> bool:
        """Submit one job while the worker (and its dispatcher) is stopped: was its message
        sent at submission (by the API), or is it left for the dispatcher?"""
        os.killpg(stack.procs["worker"].pid, signal.SIGSTOP)
        try:
            r = tenant.submit_job(chat("one"))
            assert r.status_code == 202, r.text

            def read(s: object) -> tuple[datetime, datetime | None]:
                row = s.execute(  # type: ignore[attr-defined]
                    select(Job.created_at, Job.enqueued_at).where(Job.id == r.json()["id"])
                ).one()
                return row.created_at, row.enqueued_at

            created, enqueued = db._read(read)  # type: ignore[arg-type]
        finally:
            os.killpg(stack.procs["worker"].pid, signal.SIGCONT)
        db.wait_terminal([r.json()["id"]], timeout=30, stack=stack)
        return enqueued == created

    assert sent_by_the_api()
    # A tenant with a max_share is counted against it by the dispatcher: never sent directly.
    with db.engine.begin() as conn:
        conn.execute(update(TenantRow).where(TenantRow.name == "faults").values(max_share=0.5))
    wait_for("the dispatcher to say it is open", lambda: private_redis.client().exists(flag), timeout=10)
    assert not sent_by_the_api()
    with db.engine.begin() as conn:
        conn.execute(update(TenantRow).where(TenantRow.name == "faults").values(max_share=1.0))
    _batch(tenant, 60, "bulk")  # half a minute of quota: the flag goes at the next dispatch
    wait_for("the flag to go", lambda: not private_redis.client().exists(flag), timeout=5)
    assert not sent_by_the_api()
