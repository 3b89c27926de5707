"""A worker whose call slots (PCQ_MAX_IN_FLIGHT) are fewer than the ids a message carries.

Saturation is the normal state of a worker fed a large batch; it must slow the worker down,
never stop it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import (
    Db,
    PrivateRedis,
    Tenant,
    chat,
    check_invariants,
    kill_group,
    start_stack,
    wait_worker_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


@pytest.mark.timeout(60)
def test_a_worker_with_fewer_slots_than_a_message_has_ids_still_drains_the_batch(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_MAX_IN_FLIGHT="4")
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        _, ids = tenant.submit_batch([chat(f"saturated {i} [[mock:latency_ms=100]]") for i in range(10)])
        # 10 calls of 0.1 s through 4 slots take well under a second when nothing is stuck.
        jobs = db.wait_terminal(ids, timeout=12)
    finally:
        kill_group(stack.procs["worker"])  # a stuck worker would sit out its 10 s soft shutdown
        stack.stop_all()

    check_invariants(db, ids)
    assert {j.status for j in jobs.values()} == {"succeeded"}


@pytest.mark.timeout(60)
def test_several_messages_competing_for_few_slots_all_drain(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, db: Db
) -> None:
    """4 batches of 50 ids (4 messages, taken by 4 pool threads at once) through 60 slots."""
    stack = start_stack(tmp_path, pg_url, private_redis.url, PCQ_MAX_IN_FLIGHT="60")
    try:
        wait_worker_ready(stack)
        tenant = Tenant.create(stack, pg_url)
        ids: list[str] = []
        for b in range(4):
            _, batch_ids = tenant.submit_batch(
                [chat(f"compete {b}-{i} [[mock:latency_ms=200]]") for i in range(50)]
            )
            ids += batch_ids
        jobs = db.wait_terminal(ids, timeout=30)
    finally:
        kill_group(stack.procs["worker"])
        stack.stop_all()

    check_invariants(db, ids)
    assert {j.status for j in jobs.values()} == {"succeeded"}
