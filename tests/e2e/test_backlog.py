"""A backlog far behind the quota: jobs wait in the broker, and the sweeper does not re-send
them just because their message is old."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pcq.db import make_engine, make_session_factory
from pcq.models import Job, utcnow
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
        submitted = utcnow()
        r = httpx.post(
            f"{stack.api_url}/v1/batches",
            content=lines,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        time.sleep(5)  # 15 sweeps, each of which sees messages 4 s older than the threshold
        settings = load_settings({"REDIS_URL": redis_url, "PCQ_QUEUE_NAME": env["PCQ_QUEUE_NAME"]})
        backlog = Enqueuer(make_celery(settings, publisher=True), settings.queue_name).backlog()
        with sessions() as s:
            queued = s.scalar(select(func.count()).where(Job.status == "queued"))
            resent = s.scalar(
                select(func.count()).where(
                    Job.status == "queued", Job.enqueued_at > submitted + timedelta(seconds=3)
                )
            )
        assert queued is not None
        assert queued > 2000
        assert backlog is not None
        assert backlog >= 10
        assert resent == 0, f"{resent} waiting job(s) were sent again"
    finally:
        engine.dispose()
        stack.stop_all()
