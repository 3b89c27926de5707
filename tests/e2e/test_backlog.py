"""A backlog far behind the quota: it waits in the database, not in the broker (the dispatcher
sends about a horizon of it at a time), and nothing is sent twice because its message is old."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pcq.db import make_engine, make_session_factory
from pcq.models import Job
from pcq.queue import Enqueuer, make_celery
from pcq.settings import load_settings
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]


def test_messages_waiting_their_turn_are_not_sent_again(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    env = stack_env(pg_url, redis_url)
    env.update(
        PCQ_RATE_LIMIT_PER_MINUTE="60",
        PCQ_ADMISSION_HORIZON_SECONDS="1",
        PCQ_REQUEUE_AFTER_SECONDS="1",  # every message is "old" after a second
        PCQ_SWEEP_INTERVAL_SECONDS="0.3",
    )
    stack = Stack(env, tmp_path)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    try:
        stack.start_mock()
        stack.start_api()
        stack.start_worker()
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"b{i}",
                    "body": {"model": "speed", "messages": [{"role": "user", "content": f"b {i}"}]},
                }
            )
            + "\n"
            for i in range(2500)  # 50 messages: more than the worker's pool reserves (8 x 4)
        )
        key = create_key_at(pg_url, "backlog")
        r = httpx.post(
            f"{stack.api_url}/v1/batches",
            content=lines,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        time.sleep(5)  # 15 sweeps, each of which would take a message sent 1 s ago for lost
        settings = load_settings({"REDIS_URL": redis_url, "PCQ_QUEUE_NAME": env["PCQ_QUEUE_NAME"]})
        backlog = Enqueuer(make_celery(settings, publisher=True), settings.queue_name).backlog()
        with sessions() as s:
            queued = s.scalar(select(func.count()).where(Job.status == "queued"))
            unsent = s.scalar(select(func.count()).where(Job.status == "queued", Job.enqueued_at.is_(None)))
            called_twice = s.scalar(select(func.count()).where(Job.attempts > 1))
        assert queued is not None
        assert queued > 2000
        # 60/min with a 1 s horizon: a few jobs in the broker at a time (burst 5), the rest
        # waiting in the database for the dispatcher.
        assert unsent is not None
        assert unsent >= queued - 20, (queued, unsent)
        assert backlog is not None
        assert backlog <= 20
        assert called_twice == 0
    finally:
        engine.dispose()
        stack.stop_all()
