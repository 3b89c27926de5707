"""PostgreSQL restarts (``pg_ctl restart -m fast``) while calls are in flight.

The test runs its own PostgreSQL 15 cluster (the ``private_pg`` fixture: initdb + pg_ctl as the
``postgres`` OS user, a free port on 127.0.0.1, trust auth, a data directory under /tmp that is
removed at the end), so the shared cluster on 5432 is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults.helpers import (
    Db,
    PrivatePostgres,
    PrivateRedis,
    Tenant,
    chat,
    check_invariants,
    fault_env,
    mock_calls,
    start_stack,
    wait_for,
    wait_worker_ready,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


def run_through_postgres_fault(
    tmp_path: Path, pg: PrivatePostgres, redis: PrivateRedis, fault: Callable[[Tenant], None]
) -> None:
    """Batch A in flight at the upstream, the fault, then batch B once the API accepts again;
    every job must succeed, with one result each, and the worker process must be the same."""
    db = Db(pg.url)
    stack = start_stack(tmp_path, pg.url, redis.url)
    try:
        wait_worker_ready(stack)
        worker = stack.procs["worker"]
        tenant = Tenant.create(stack, pg.url)
        texts = [f"pg fault {i} [[mock:latency_ms=1500]]" for i in range(10)]
        _, ids = tenant.submit_batch([chat(t) for t in texts])

        def in_flight() -> bool:
            return all(j.status == "running" for j in db.jobs(ids).values()) and (
                stack.mock_stats()["in_flight"] == 10
            )

        wait_for("10 calls in flight", in_flight, timeout=15, interval=0.05)
        fault(tenant)

        # The API recovers by itself too: a batch submitted right after is accepted.
        def submit_after() -> list[str] | None:
            more = [f"after the fault {i} [[mock:latency_ms=10]]" for i in range(4)]
            try:
                _, new_ids = tenant.submit_batch([chat(t) for t in more])
            except (AssertionError, httpx.HTTPError):
                return None
            texts.extend(more)
            return new_ids

        ids += wait_for("the API to accept a batch again", submit_after, timeout=15, interval=0.5)
        jobs = db.wait_terminal(ids, timeout=40, stack=stack)
        stats = stack.mock_stats()
        assert worker.poll() is None  # the same worker process carried on
        assert stack.procs["worker"] is worker
    finally:
        stack.stop_all()
        db.close()

    db = Db(pg.url)
    try:
        rep = check_invariants(db, ids)
    finally:
        db.close()
    assert rep.by_status == {"succeeded": 14}, rep.by_status
    # No process died, so every call came back and is recorded, and every claim made a call
    # (a call whose lease expired during the outage may have been run again: then both
    # calls have rows and only one stored the result).
    for job_id, text in zip(ids, texts, strict=True):
        assert mock_calls(stats, text) == len(rep.attempts[job_id]) >= 1, text
    assert rep.attempts_claimed == rep.attempt_rows
    assert all(j.attempts <= 2 for j in jobs.values())


@pytest.mark.timeout(60)
def test_postgres_restart_mid_batch_loses_no_job_and_the_worker_recovers_by_itself(
    tmp_path: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis
) -> None:
    def restart(_: Tenant) -> None:
        t0 = time.monotonic()
        private_pg.restart()  # pg_ctl restart -m fast: every connection is cut
        assert time.monotonic() - t0 < 20, private_pg.log()

    run_through_postgres_fault(tmp_path, private_pg, private_redis, restart)


@pytest.mark.timeout(60)
def test_postgres_down_while_calls_return_loses_no_job(
    tmp_path: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis
) -> None:
    """PostgreSQL stays down (4 s) across the moment the in-flight calls come back, and past
    their leases: outcomes wait in the worker and are written once it is back."""
    answers: list[httpx.Response] = []

    def outage(tenant: Tenant) -> None:
        private_pg.stop()
        try:
            answers.append(tenant.submit_job(chat("during the outage [[mock:latency_ms=10]]")))
            answers.append(httpx.get(f"{tenant.stack.api_url}/readyz", timeout=10))
            time.sleep(4)
        finally:
            private_pg.start()

    run_through_postgres_fault(tmp_path, private_pg, private_redis, outage)
    submitted, ready = answers
    # Nothing durable, so no 202: the submission is refused with a server error.
    assert submitted.status_code >= 500, submitted.text
    assert ready.status_code == 503, ready.text


@pytest.mark.timeout(60)
def test_a_submission_while_postgres_is_down_answers_503_with_the_error_shape(
    tmp_path: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis
) -> None:
    stack = Stack(fault_env(private_pg.url, private_redis.url), tmp_path)
    try:
        stack.start_api()  # the API alone: nothing else is involved
        tenant = Tenant.create(stack, private_pg.url)
        private_pg.stop()
        try:
            r = tenant.submit_job(chat("while the database is down"))
        finally:
            private_pg.start()
    finally:
        stack.stop_all()
    assert r.status_code == 503, (r.status_code, r.text)
    assert set(r.json()) == {"error", "detail"}, r.text
