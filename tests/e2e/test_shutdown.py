"""A worker stopped politely (SIGTERM) hands its running jobs back at once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from pcq.db import make_engine, make_session_factory
from pcq.models import Job
from pcq.tenants import create_key_at
from tests.audit import audit
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


def test_sigterm_releases_running_jobs_to_another_worker_without_waiting_for_the_lease(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = stack_env(pg_url, redis_url)
    env["PCQ_LEASE_SECONDS"] = "600"  # so only the hand-back can explain a quick recovery
    stack = Stack(env, tmp_path)
    try:
        stack.start_mock("--latency-ms", "20")
        stack.start_api()
        first = stack.start_worker("worker-1")
        key = create_key_at(pg_url, "stop")
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"s{i}",
                    "body": {
                        "model": "lite",
                        "messages": [
                            {"role": "user", "content": f"slow {i} [[mock:latency_ms=30000,times=1]]"}
                        ],
                    },
                }
            )
            + "\n"
            for i in range(5)
        )
        h = {"Authorization": f"Bearer {key}"}
        batch = httpx.post(
            f"{stack.api_url}/v1/batches",
            content=lines,
            headers={**h, "Content-Type": "application/x-ndjson"},
        ).json()
        engine = make_engine(pg_url)
        sessions = make_session_factory(engine)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with sessions() as s:
                running = s.scalars(
                    select(Job.id).where(Job.batch_id == batch["id"], Job.status == "running")
                ).all()
            if len(running) == 5:
                break
            time.sleep(0.1)
        assert len(running) == 5
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        stopped_at = time.monotonic()
        stack.start_worker("worker-2")
        while time.monotonic() < stopped_at + 60:
            if httpx.get(f"{stack.api_url}/v1/batches/{batch['id']}", headers=h).json()["done"]:
                break
            time.sleep(0.2)
        a = audit(pg_url, batch["id"])
        assert a.by_status == {"succeeded": 5}, stack.logs()
        assert a.results == 5
        # The first calls outlived the 10 s drain and were abandoned: each job ran again.
        assert a.attempts_claimed == 10
        assert a.attempts == 5
        assert time.monotonic() - stopped_at < 60  # far less than the 600 s lease
        engine.dispose()
    finally:
        stack.stop_all()


def test_jobs_waiting_for_the_quota_stay_unclaimed_and_a_sigterm_is_prompt(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """With the quota far behind the backlog, a worker claims only what the quota can start
    within the admission horizon: the rest stay `queued` with no attempt spent. SIGTERM then
    stops the worker promptly (its pool threads are waiting for quota, not for calls), and
    another worker finishes everything with exactly one claim per job."""
    env = stack_env(pg_url, redis_url)
    env.update(
        PCQ_RATE_LIMIT_PER_MINUTE="60",  # 58/min once made window-safe: about one call a second
        PCQ_RATE_LIMIT_BURST="0",
        PCQ_ADMISSION_HORIZON_SECONDS="2",
    )
    stack = Stack(env, tmp_path)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    try:
        stack.start_mock("--latency-ms", "20")
        stack.start_api()
        first = stack.start_worker("worker-1")
        key = create_key_at(pg_url, "quota")
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"q{i}",
                    "body": {"model": "lite", "messages": [{"role": "user", "content": f"q {i}"}]},
                }
            )
            + "\n"
            for i in range(60)
        )
        h = {"Authorization": f"Bearer {key}"}
        batch = httpx.post(
            f"{stack.api_url}/v1/batches",
            content=lines,
            headers={**h, "Content-Type": "application/x-ndjson"},
        ).json()
        time.sleep(6)
        with sessions() as s:
            claimed = s.scalars(select(Job.attempts).where(Job.batch_id == batch["id"])).all()
        # About 6 calls made and a horizon's worth (2-3) waiting: never the whole backlog.
        assert 3 <= sum(claimed) <= 14, sorted(claimed)
        first.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        first.wait(30)
        assert time.monotonic() - sent_at < 15
        stack.env["PCQ_RATE_LIMIT_PER_MINUTE"] = "60000"
        stack.start_worker("worker-2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{stack.api_url}/v1/batches/{batch['id']}", headers=h).json()["done"]:
                break
            time.sleep(0.2)
        a = audit(pg_url, batch["id"])
        assert a.by_status == {"succeeded": 60}, stack.logs()
        assert a.attempts == 60
        # Waiting for the quota spent no claim; only calls cut short by the stop could add one.
        assert a.attempts_claimed <= 61
    finally:
        engine.dispose()
        stack.stop_all()
