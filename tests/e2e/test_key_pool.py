"""Several upstream keys and a shared in-flight cap, on real processes (PostgreSQL + Redis).

Two Celery workers share the pool through Redis; the mock upstream counts each key's calls,
enforces each key's own quota per sliding minute, and records how many calls were open at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from pcq.settings import key_id, normalize_database_url
from pcq.tenants import create_key_at
from tests.audit import audit
from tests.e2e.test_pipeline import batch_lines, run_batch
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e]

KEY_SMALL, KEY_BIG = "sk-e2e-pool-small-0001", "sk-e2e-pool-big-0002"


def digest(key: str) -> str:  # how the mock names a key in /mock/stats
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@pytest.fixture
def env(pg_url: str, redis_url: str) -> dict[str, str]:
    return stack_env(pg_url, redis_url)


def start(env: dict[str, str], tmp_path: Path, *mock_args: str, workers: int = 2) -> Stack:
    s = Stack(env, tmp_path)
    s.start_mock(*mock_args)
    s.start_api()
    for n in range(workers):
        s.start_worker(f"worker-{n}")
    return s


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for s in started:
        s.stop_all()


def test_calls_split_over_keys_by_quota_and_no_key_is_overrun(
    env: dict[str, str], pg_url: str, tmp_path: Path, stacks: list[Stack]
) -> None:
    env.update(
        PARALLEL_API_KEY=KEY_SMALL,
        PCQ_RATE_LIMIT_PER_MINUTE="600",
        PCQ_UPSTREAM_KEYS=f'[{{"key": "{KEY_BIG}", "rate_limit_per_minute": 1800}}]',
        MOCK_QUOTAS=f"{KEY_SMALL}=600,{KEY_BIG}=1800",
    )
    s = start(env, tmp_path, "--enforce-rpm-by-key-env", "MOCK_QUOTAS")
    stacks.append(s)
    n = 160
    state = run_batch(s, create_key_at(pg_url, "pool"), batch_lines(n), timeout=60)
    assert state["counts"]["succeeded"] == n, s.logs()
    stats = s.mock_stats()
    assert stats["rate_limited_by_enforcer"] == 0
    small, big = stats["by_key"][digest(KEY_SMALL)], stats["by_key"][digest(KEY_BIG)]
    assert small["requests"] + big["requests"] == n
    # Slots interleave by time at 589/min and 1,761/min (each quota made window-safe), after
    # each key's burst of 6: the big key carries about three quarters of the calls.
    assert 0.65 <= big["requests"] / n <= 0.85, (small, big)
    assert audit(pg_url, state["id"]).attempts == n
    # The audit trail names the key that carried each call, as the upstream counted them.
    engine = create_engine(normalize_database_url(pg_url))
    with engine.connect() as c:
        query = text(
            "SELECT a.upstream_key_id, count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE j.batch_id = :b GROUP BY a.upstream_key_id"
        )
        rows = {k: n for k, n in c.execute(query, {"b": state["id"]})}
    engine.dispose()
    assert rows == {key_id(KEY_SMALL): small["requests"], key_id(KEY_BIG): big["requests"]}
    logs = s.logs()
    assert KEY_SMALL not in logs
    assert KEY_BIG not in logs


def test_in_flight_cap_per_key_holds_across_workers(
    env: dict[str, str], pg_url: str, tmp_path: Path, stacks: list[Stack]
) -> None:
    env.update(PCQ_MAX_IN_FLIGHT_PER_KEY="4")
    s = start(env, tmp_path, "--latency-ms", "250")
    stacks.append(s)
    n = 48
    state = run_batch(s, create_key_at(pg_url, "pool"), batch_lines(n), timeout=60)
    assert state["counts"]["succeeded"] == n, s.logs()
    stats = s.mock_stats()
    assert stats["requests"] == n
    assert stats["max_in_flight"] == 4  # the cap, reached, never passed, by 2 workers together
