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
from pcq.testing import Stack, audit, mint_key, stack_env

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
        key = mint_key(pg_url, "stop")
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
