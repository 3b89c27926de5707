"""The upstream misbehaves: 429 storms with Retry-After, hangs, truncated and malformed answers.

Directives in the last user message make the mock upstream misbehave exactly (see
mock_upstream/server.py); ``times=N`` limits a fault to the first N requests with that content.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcq.wire import iter_sse_data
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
def test_a_429_storm_with_retry_after_is_honoured_by_every_worker(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url)
    try:
        stack.start_worker("worker2")  # two processes share the limiter's cool-down
        wait_worker_ready(stack)
        wait_worker_ready(stack, "worker2")
        tenant = Tenant.create(stack, pg_url)
        storm = "storm [[mock:status=429,times=3,retry_after=2]]"
        _, (storm_id,) = tenant.submit_batch([chat(storm)])
        first = wait_for(
            "the first 429", lambda: db.report([storm_id]).attempts[storm_id], timeout=15, interval=0.05
        )
        # Submitted during the cool-down the first 429 started; either worker may take it.
        bystander = "bystander [[mock:latency_ms=10]]"
        _, (bystander_id,) = tenant.submit_batch([chat(bystander)])
        jobs = db.wait_terminal([storm_id, bystander_id], timeout=30, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    rep = check_invariants(db, [storm_id, bystander_id])
    assert jobs[storm_id].status == "succeeded"
    assert jobs[storm_id].attempts == 4
    rows = rep.attempts[storm_id]
    assert [(a.number, a.status_code, a.error_class) for a in rows] == [
        (1, 429, "rate_limited"),
        (2, 429, "rate_limited"),
        (3, 429, "rate_limited"),
        (4, 200, None),
    ]
    assert all(a.retry_after_seconds == 2.0 for a in rows[:3])
    # No retry before Retry-After: each call starts at least 2 s after the 429 before it.
    gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in zip(rows, rows[1:], strict=False)]
    assert all(g >= 2.0 for g in gaps), gaps
    assert mock_calls(stats, storm) == 4
    # The cool-down is shared: the other job's call also waited until 2 s after that 429.
    (b_attempt,) = rep.attempts[bystander_id]
    assert (b_attempt.started_at - first[0].finished_at).total_seconds() >= 2.0
    assert jobs[bystander_id].status == "succeeded"


@pytest.mark.timeout(60)
def test_a_hung_upstream_call_times_out_and_is_retried(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_TOTAL_TIMEOUT_SECONDS="2")
    try:
        tenant = Tenant.create(stack, pg_url)
        hang, quick = "hang [[mock:hang,times=1]]", "quick [[mock:latency_ms=10]]"
        _, ids = tenant.submit_batch([chat(hang), chat(quick)])
        jobs = db.wait_terminal(ids, timeout=30, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    hang_id, quick_id = ids
    assert jobs[hang_id].status == "succeeded"
    assert jobs[hang_id].attempts == 2
    timed_out, ok = rep.attempts[hang_id]
    assert (timed_out.outcome, timed_out.error_class, timed_out.status_code) == ("retryable", "timeout", None)
    assert 1900 <= timed_out.latency_ms < 4000, timed_out  # the 2 s deadline fired
    assert (ok.number, ok.outcome) == (2, "ok")
    assert rep.result_attempt[hang_id] == 2
    assert mock_calls(stats, hang) == 2
    # The hung call held no one else up.
    (q,) = rep.attempts[quick_id]
    assert q.finished_at < timed_out.finished_at


def _complete_stream(raw: str) -> bool:
    data = list(iter_sse_data(raw))
    return bool(data) and data[-1].strip() == "[DONE]" and all(json.loads(d) for d in data[:-1])


@pytest.mark.timeout(60)
def test_truncated_and_malformed_answers_are_never_stored_and_retries_are_bounded(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_MAX_ATTEMPTS="3")
    cases = [
        # (content, stream, expected error_class of each attempt; None = ok)
        ("a [[mock:truncate,times=1]]", True, ["truncated", None]),
        ("b [[mock:truncate,times=1]]", False, ["malformed", None]),  # JSON cut in half
        ("c [[mock:malformed,times=2]]", False, ["malformed", "malformed", None]),
        ("d [[mock:malformed,times=2]]", True, ["malformed", "malformed", None]),
        ("e [[mock:malformed]]", False, ["malformed"] * 3),  # for ever: fails after 3
        ("f [[mock:truncate]]", True, ["truncated"] * 3),  # for ever: fails after 3
    ]
    try:
        tenant = Tenant.create(stack, pg_url)
        _, ids = tenant.submit_batch([chat(c, stream=s) for c, s, _ in cases])
        jobs = db.wait_terminal(ids, timeout=40, stack=stack)
        stats = stack.mock_stats()
    finally:
        stack.stop_all()

    rep = check_invariants(db, ids)
    for job_id, (content, stream, expected) in zip(ids, cases, strict=True):
        job, rows = jobs[job_id], rep.attempts[job_id]
        assert [a.error_class for a in rows] == expected, (content, rows)
        assert job.attempts == len(expected) == mock_calls(stats, content), content
        if expected[-1] is None:
            assert job.status == "succeeded", content
            assert rep.result_attempt[job_id] == len(expected)  # stored by the good answer
            raw = rep.raw_bodies[job_id]
            assert _complete_stream(raw) if stream else json.loads(raw)["choices"], content
        else:
            assert job.status == "failed", content
            assert job.error_code == expected[0]
            assert job.error is not None
            assert "gave up after 3 attempts" in job.error
            assert rep.results[job_id] == 0
