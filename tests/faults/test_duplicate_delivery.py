"""The same task message delivered more than once: one upstream call, one result.

Celery over Redis delivers at least once (a visibility-timeout re-delivery, a reconnect, a
sweeper re-send racing a slow consumer). The claim in the database is what makes a copy
harmless: a copy of a message for a job that is running under a live lease, or already done,
claims nothing and is dropped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pcq.queue import Enqueuer, make_celery
from pcq.settings import load_settings
from tests.faults.helpers import (
    Db,
    PrivateRedis,
    Tenant,
    chat,
    check_invariants,
    mock_calls,
    start_stack,
    wait_for,
    wait_worker_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


@pytest.mark.timeout(60)
def test_the_same_message_delivered_again_makes_no_second_call(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url)
    settings = load_settings(stack.env)
    app = make_celery(settings)
    enqueuer = Enqueuer(app, settings.queue_name)
    queue = settings.queue_name
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        content = "delivered twice [[mock:latency_ms=1500]]"
        r = tenant.submit_job(chat(content))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def consumed() -> bool:
            return private_redis.queue_depth(queue) == (0, 0)

        # The API's own message is let through: the job is claimed and its call is open.
        def in_flight() -> bool:
            job = db.jobs([job_id])[job_id]
            return job.status == "running" and stack.mock_stats()["in_flight"] == 1

        wait_for("the first call in flight", in_flight, timeout=15, interval=0.05)
        # Copies while the call runs: the id twice in one send, and two separate messages.
        assert enqueuer.enqueue([job_id, job_id]) == 2
        assert enqueuer.enqueue([job_id]) == 1
        assert enqueuer.enqueue([job_id]) == 1
        wait_for("the copies to be consumed", consumed, timeout=10, interval=0.05)
        assert db.jobs([job_id])[job_id].attempts == 1  # no copy claimed it

        jobs = db.wait_terminal([job_id], timeout=15, stack=stack)
        # Copies after it succeeded.
        assert enqueuer.enqueue([job_id, job_id]) == 2
        assert enqueuer.enqueue([job_id]) == 1
        wait_for("the late copies to be consumed", consumed, timeout=10, interval=0.05)
        time.sleep(0.5)  # a claim that (wrongly) succeeded would have called by now
        stats = stack.mock_stats()
        after = db.jobs([job_id])[job_id]
    finally:
        app.close()
        stack.stop_all()

    rep = check_invariants(db, [job_id])
    assert jobs[job_id].status == "succeeded"
    assert after.status == "succeeded"
    assert after.attempts == 1
    assert mock_calls(stats, content) == 1
    assert stats["requests"] == 1
    assert rep.results[job_id] == 1
    assert [a.number for a in rep.attempts[job_id]] == [1]
