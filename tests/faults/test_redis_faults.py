"""Redis loses everything (FLUSHALL, a restart without persistence) or is down at submission.

Each test runs its own redis-server on a free port (never the shared one on 6379). Redis is
only the wake-up channel: the database holds every job, and each worker's sweeper re-sends
a queued job whose message was never sent, or was sent before the broker lost its data (the
marker of pcq/broker_epoch.py is gone), or was sent ``PCQ_REQUEUE_AFTER_SECONDS`` ago.

The FLUSHALL and restart tests run the two settings that bound the recovery at their shipped
defaults (``PCQ_REQUEUE_AFTER_SECONDS`` 300 s, ``PCQ_SWEEP_INTERVAL_SECONDS`` 2 s) and measure
the time from the loss to the last lost job being claimed again (``jobs.started_at``).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pcq.models import Job, utcnow
from tests.faults.helpers import (
    Db,
    PrivateRedis,
    Report,
    Tenant,
    chat,
    check_invariants,
    dispatch_waiting,
    fault_env,
    mock_calls,
    start_stack,
    wait_for,
    wait_worker_ready,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]

# Settings the fault helpers shorten that bound the recovery from a broker loss: these tests
# leave them at their shipped defaults.
RECOVERY_SETTINGS = ("PCQ_REQUEUE_AFTER_SECONDS", "PCQ_SWEEP_INTERVAL_SECONDS")
RECOVERY_BUDGET_SECONDS = 10.0


def start_stack_with_default_recovery(workdir: Path, database_url: str, redis_url: str) -> Stack:
    """``start_stack``, with the settings that bound the recovery left at their defaults."""
    env = fault_env(database_url, redis_url)
    for name in RECOVERY_SETTINGS:
        env.pop(name)
    stack = Stack(env, workdir)
    try:
        stack.start_mock()
        stack.start_api()
        stack.start_worker()
    except BaseException:
        stack.stop_all()
        raise
    return stack


def seconds_until_claimed(db: Db, ids: list[str], since: datetime) -> float:
    """From ``since`` to the first claim of the last of ``ids`` (the worker stamps
    ``started_at`` with the same host clock)."""
    with Session(db.engine) as s:
        rows = s.execute(select(Job.id, Job.started_at).where(Job.id.in_(ids))).all()
    started = {job_id: at for job_id, at in rows}
    assert all(started.get(i) is not None for i in ids), started
    return max((t - since).total_seconds() for t in started.values() if t is not None)


def texts(tag: str, n: int, latency_ms: int) -> list[str]:
    return [f"{tag} {i} [[mock:latency_ms={latency_ms}]]" for i in range(n)]


def assert_each_call_recorded(
    rep: Report, stats: dict[str, Any], contents: dict[str, str], ids: list[str]
) -> None:
    """No worker died here, so every upstream call came back and has its attempt row."""
    for job_id in ids:
        calls = mock_calls(stats, contents[job_id])
        assert calls == len(rep.attempts[job_id]), (contents[job_id], calls, rep.attempts[job_id])


class MidBatch:
    """Batch A in flight at the upstream while jobs B exist only as messages in Redis.

    The worker is paused (SIGSTOP, well under its lease) while B is submitted, one POST per
    job so one message per job: a paused consumer's pending BRPOP still swallows the first
    message into its socket, the others wait in the Redis list for the fault to destroy.
    """

    def __init__(self, stack: Stack, db: Db, redis: PrivateRedis, tenant: Tenant) -> None:
        self.stack, self.db, self.redis, self.tenant = stack, db, redis, tenant
        self.queue = stack.env["PCQ_QUEUE_NAME"]
        self.contents: dict[str, str] = {}
        self.ids: list[str] = []
        self.only_in_redis: list[str] = []  # batch B: the jobs whose messages the fault loses

    def submit_batch(self, tag: str, n: int, latency_ms: int) -> list[str]:
        batch = texts(tag, n, latency_ms)
        _, ids = self.tenant.submit_batch([chat(t) for t in batch])
        self.contents.update(zip(ids, batch, strict=True))
        self.ids += ids
        return ids

    def submit_singles(self, tag: str, n: int, latency_ms: int) -> list[str]:
        ids = []
        for text in texts(tag, n, latency_ms):
            r = self.tenant.submit_job(chat(text))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            self.contents[ids[-1]] = text
        self.ids += ids
        return ids

    def start(self) -> int:
        a = self.submit_batch("in flight", 6, 2000)

        def in_flight() -> bool:
            running = all(j.status == "running" for j in self.db.jobs(a).values())
            return running and self.stack.mock_stats()["in_flight"] == 6

        wait_for("batch A in flight", in_flight, timeout=15, interval=0.05)
        os.killpg(self.stack.procs["worker"].pid, signal.SIGSTOP)
        try:
            self.only_in_redis = self.submit_singles("only in redis", 6, 10)
            # The API sent them itself if the dispatcher said nothing waits; any it left to the
            # dispatcher (which lives in the stopped worker) go as another worker's would send them.
            dispatch_waiting(self.stack, self.db.engine)
            assert all(j.enqueued_at is not None for j in self.db.jobs(self.only_in_redis).values())
            waiting, _ = self.redis.queue_depth(self.queue)
        except BaseException:
            self.resume()
            raise
        return waiting

    def resume(self) -> None:
        os.killpg(self.stack.procs["worker"].pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_flushall_mid_batch_loses_no_job(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack_with_default_recovery(tmp_path, pg_url, private_redis.url)
    try:
        wait_worker_ready(stack)
        mid = MidBatch(stack, db, private_redis, Tenant.create(stack, pg_url))
        waiting = mid.start()
        try:
            flushed_at = utcnow()
            private_redis.flushall()  # queue, unacked set, limiter state, epoch marker: all gone
            assert private_redis.queue_depth(mid.queue) == (0, 0)
        finally:
            mid.resume()
        # New messages still reach the worker right after the flush (the default exchange
        # needs no binding keys).
        c = mid.submit_batch("after flush", 4, 10)
        db.wait_terminal(c, timeout=4, stack=stack)
        jobs = db.wait_terminal(mid.ids, timeout=30, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    assert waiting > 0  # batch B's messages were in Redis when it was flushed
    # The sweeper saw the epoch marker gone and re-sent batch B at once, with a re-send
    # delay of 300 s (the default): within seconds, not minutes.
    recovery = seconds_until_claimed(db, mid.only_in_redis, flushed_at)
    print(f"\nFLUSHALL: every lost job claimed again {recovery:.2f} s after the flush")
    assert recovery < RECOVERY_BUDGET_SECONDS, recovery
    rep = check_invariants(db, mid.ids)
    assert rep.by_status == {"succeeded": 16}, rep.by_status
    # Nothing ran twice.
    assert all(j.attempts == 1 for j in jobs.values()), {k: j.attempts for k, j in jobs.items()}
    assert rep.attempt_rows == rep.attempts_claimed == 16
    assert_each_call_recorded(rep, stats, mid.contents, mid.ids)


@pytest.mark.timeout(60)
def test_redis_restart_mid_batch_loses_no_job(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack_with_default_recovery(tmp_path, pg_url, private_redis.url)
    try:
        wait_worker_ready(stack)
        worker_pid = stack.procs["worker"].pid
        mid = MidBatch(stack, db, private_redis, Tenant.create(stack, pg_url))
        waiting = mid.start()
        try:
            killed_at = utcnow()
            private_redis.kill()  # SIGKILL, no persistence: it comes back empty
        finally:
            mid.resume()  # the worker lives through the outage
        time.sleep(1.0)
        private_redis.start()  # same port
        back_at = utcnow()
        c = mid.submit_batch("after restart", 4, 10)
        jobs = db.wait_terminal(mid.ids, timeout=40, stack=stack)
        stats = stack.mock_stats()
        assert stack.procs["worker"].pid == worker_pid
        assert stack.procs["worker"].poll() is None  # the same worker reconnected by itself
    finally:
        stack.stop_all()

    assert waiting > 0
    assert len(c) == 4
    recovery = seconds_until_claimed(db, mid.only_in_redis, back_at)
    down = (back_at - killed_at).total_seconds()
    print(
        f"\nRedis restart: every lost job claimed again {recovery:.2f} s after Redis was back "
        f"({down:.1f} s down)"
    )
    assert recovery < RECOVERY_BUDGET_SECONDS, recovery
    rep = check_invariants(db, mid.ids)
    assert rep.by_status == {"succeeded": 16}, rep.by_status
    # Every call that was made is recorded, and each job was called once. A claim whose call
    # never started (the shared limiter lives in Redis; a call that cannot reach it fails
    # before the upstream) counts in jobs.attempts without a row, so claims >= rows.
    assert_each_call_recorded(rep, stats, mid.contents, mid.ids)
    assert all(len(rep.attempts[i]) == 1 for i in mid.ids), {i: len(rep.attempts[i]) for i in mid.ids}
    assert rep.attempts_claimed >= rep.attempt_rows == 16
    assert all(j.attempts <= 5 for j in jobs.values())  # within PCQ_MAX_ATTEMPTS (default 5)


@pytest.mark.timeout(60)
def test_submissions_while_redis_is_down_are_durable_and_run_once_it_is_back(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url)
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        # A first job goes through, so the API holds a broker connection about to go stale.
        warm = tenant.submit_job(chat("warm-up [[mock:latency_ms=10]]"))
        assert warm.status_code == 202, warm.text
        db.wait_terminal([warm.json()["id"]], timeout=15, stack=stack)

        private_redis.kill()
        ready = httpx.get(f"{stack.api_url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text

        # Submissions while Redis is down, concurrently (each can wait for the broker).
        singles = [f"while down {i} [[mock:latency_ms=10]]" for i in range(4)]
        batch = [f"batch while down {i} [[mock:latency_ms=10]]" for i in range(3)]

        def post_single(text: str) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            return tenant.submit_job(chat(text)), time.monotonic() - t0

        def post_batch() -> tuple[list[str], float]:
            t0 = time.monotonic()
            return tenant.submit_batch([chat(t) for t in batch])[1], time.monotonic() - t0

        with ThreadPoolExecutor(5) as pool:
            batch_future = pool.submit(post_batch)
            answers = list(pool.map(post_single, singles))
            batch_ids, batch_seconds = batch_future.result()
        contents: dict[str, str] = dict(zip(batch_ids, batch, strict=True))
        for (r, _), text in zip(answers, singles, strict=True):
            assert r.status_code in (202, 503), r.text  # 503: refused, nothing promised
            if r.status_code == 202:
                contents[r.json()["id"]] = text
        slowest = max([batch_seconds] + [t for _, t in answers])
        accepted = list(contents)
        assert len(accepted) == 7  # the database is up, so everything was accepted

        # A 202 means durable: every accepted job is in the database, queued, and stays
        # there while the worker's sweeper fails to reach Redis.
        time.sleep(1.0)
        rows = db.jobs(accepted)
        assert {(j.status, j.attempts) for j in rows.values()} == {("queued", 0)}

        private_redis.start()  # same port, empty
        jobs = db.wait_terminal(accepted, timeout=40, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    # The API tries to reach the broker before answering (kombu's connect retries: ~6 s
    # measured here), but answers within the test's bound either way.
    assert slowest < 15, f"a submission took {slowest:.1f} s with Redis down"
    rep = check_invariants(db, accepted)
    assert {j.status for j in jobs.values()} == {"succeeded"}
    # Each job was called exactly once and that call is recorded. jobs.attempts may count
    # one claim more than the rows (see test_a_redis_restart_does_not_cost_a_claim_an_attempt).
    assert all(mock_calls(stats, contents[i]) == 1 == len(rep.attempts[i]) for i in accepted)
    assert rep.attempts_claimed >= rep.attempt_rows == 7


@pytest.mark.timeout(60)
def test_a_redis_restart_does_not_cost_a_claim_an_attempt(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url)
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        warm = tenant.submit_job(chat("warm-up [[mock:latency_ms=10]]"))
        db.wait_terminal([warm.json()["id"]], timeout=15, stack=stack)  # the limiter is connected
        private_redis.kill()
        private_redis.start()
        _, ids = tenant.submit_batch([chat("after the restart [[mock:latency_ms=10]]")])
        jobs = db.wait_terminal(ids, timeout=40, stack=stack)
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    assert jobs[ids[0]].status == "succeeded"
    # One claim, one call, one row; not a second claim after a wasted lease.
    assert jobs[ids[0]].attempts == 1 == len(rep.attempts[ids[0]]), (jobs[ids[0]], rep.attempts[ids[0]])
