"""Workers killed with SIGKILL: mid-call, and on every attempt of one poison job.

A killed worker writes nothing: the upstream call it had in flight leaves no attempt row,
but the claim had already counted it in ``jobs.attempts``. The job's lease (3 s here)
expires, any live worker's sweeper sends it again, and the next claim runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pcq.models.job import TERMINAL_STATUSES
from tests.faults.helpers import (
    Db,
    PrivateRedis,
    Tenant,
    chat,
    check_invariants,
    kill_group,
    mock_calls,
    start_stack,
    wait_for,
    wait_worker_ready,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


@pytest.mark.timeout(60)
def test_kill_9_worker_mid_call_reruns_each_job_once(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url)
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        contents = [f"kill test {i} [[mock:latency_ms=1500]]" for i in range(8)]
        _, ids = tenant.submit_batch([chat(c, stream=i % 2 == 1) for i, c in enumerate(contents)])

        # Every call is at the upstream (claimed in the database, open at the mock) ...
        def all_in_flight() -> bool:
            jobs = db.jobs(ids)
            return all(j.status == "running" for j in jobs.values()) and stack.mock_stats()["in_flight"] == 8

        wait_for("all 8 calls in flight", all_in_flight, timeout=15, interval=0.05)
        # ... when the worker dies without a chance to write anything.
        kill_group(stack.procs["worker"])
        assert all(j.status == "running" and j.attempts == 1 for j in db.jobs(ids).values())

        stack.start_worker("worker2")
        jobs = db.wait_terminal(ids, timeout=30, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    assert {j.status for j in jobs.values()} == {"succeeded"}
    # Each job was claimed twice (the killed run and the re-run) ...
    assert all(j.attempts == 2 for j in jobs.values()), {k: j.attempts for k, j in jobs.items()}
    # ... and the upstream saw both calls: the killed one and the re-run.
    assert [mock_calls(stats, c) for c in contents] == [2] * 8
    # Only the re-run came back to a live worker, so only it has an attempt row; the killed
    # call shows as the extra claim in jobs.attempts (8 claims more than rows).
    assert {k: [a.number for a in v] for k, v in rep.attempts.items()} == {i: [2] for i in ids}
    assert rep.attempts_claimed == rep.attempt_rows + 8
    assert all(rep.result_attempt[i] == 2 for i in ids)


def kill_whenever_running(stack: Stack, db: Db, job_id: str, timeout: float) -> list[int]:
    """Whenever the job is ``running`` under a claim not yet punished, SIGKILL the worker
    (the only one alive) and start a fresh one; stop once the job is terminal. Returns the
    attempt numbers that were killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    current = "worker"
    while time.monotonic() < deadline:
        job = db.jobs([job_id])[job_id]
        if job.status in TERMINAL_STATUSES:
            return killed
        if job.status == "running" and job.attempts not in killed:
            killed.append(job.attempts)
            kill_group(stack.procs[current])
            current = f"worker{len(killed) + 1}"
            stack.start_worker(current)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still not terminal after {timeout} s (killed {killed})")


@pytest.mark.timeout(60)
def test_a_job_that_kills_its_worker_every_time_fails_after_the_cap(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_MAX_ATTEMPTS="3")
    try:
        tenant = Tenant.create(stack, pg_url)
        poison = "poison pill [[mock:latency_ms=5000]]"
        _, ids = tenant.submit_batch([chat(poison)])
        killed = kill_whenever_running(stack, db, ids[0], timeout=45)
        jobs = db.wait_terminal(ids, timeout=5, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    job = jobs[ids[0]]
    assert job.status == "failed", (job, stack.logs())
    assert job.error_code == "attempts_exhausted"
    assert killed == [1, 2, 3]  # each of the 3 allowed runs killed its worker; no 4th run
    # The 4th claim saw 3 attempts that never completed and failed the job instead of
    # running it: the counter holds 4 claims, there is no attempt row (every run died
    # before writing one), and the upstream got at most the 3 killed calls.
    assert job.attempts == 4
    assert rep.attempts[ids[0]] == []
    assert rep.results[ids[0]] == 0
    assert mock_calls(stats, poison) <= 3


@pytest.mark.timeout(60)
def test_jobs_in_flight_beside_a_poison_job_are_not_failed_with_it(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_MAX_ATTEMPTS="3")
    try:
        tenant = Tenant.create(stack, pg_url)
        poison = "poison pill [[mock:latency_ms=5000]]"
        bystander = "innocent bystander [[mock:latency_ms=1500]]"
        _, ids = tenant.submit_batch([chat(poison), chat(bystander)])
        kill_whenever_running(stack, db, ids[0], timeout=45)
        jobs = db.wait_terminal(ids, timeout=10, stack=stack)
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    poison_job, bystander_job = jobs[ids[0]], jobs[ids[1]]
    assert poison_job.error_code == "attempts_exhausted"
    assert "worker died" in (poison_job.error or "")
    assert poison_job.lease_losses == 3
    # The bystander shared the only worker with the poison job and died with it while neither
    # was a suspect (at most twice); then the poison job ran alone in the suspect lane, and
    # the bystander got its own run and succeeded, with its attempt budget untouched.
    assert bystander_job.status == "succeeded", bystander_job
    assert bystander_job.lease_losses <= 2
    assert bystander_job.attempts == bystander_job.lease_losses + 1  # each death: one re-run
    assert [a.number for a in rep.attempts[ids[1]]] == [bystander_job.attempts]
