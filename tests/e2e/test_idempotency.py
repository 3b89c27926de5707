"""Idempotency under a race: 20 identical POSTs at once against the real API on PostgreSQL."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pcq.db import make_engine, make_session_factory
from pcq.models import Job
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]

REQ = {"model": "lite", "messages": [{"role": "user", "content": "race"}]}


def _count(url: str, *where: object) -> int:
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        n = s.scalar(select(func.count()).select_from(Job).where(*where)) or 0  # type: ignore[arg-type]
    engine.dispose()
    return n


def test_twenty_racing_requests_with_one_key_make_one_job_and_one_batch(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = stack_env(pg_url, redis_url)
    env["PCQ_MAX_UPLOADS_PER_TENANT"] = "32"  # 20 racing batch uploads of one tenant, all admitted
    stack = Stack(env, tmp_path)
    try:
        stack.start_api()
        key = create_key_at(pg_url, "race")
        h = {"Authorization": f"Bearer {key}"}

        def post_job(_: int) -> httpx.Response:
            return httpx.post(
                f"{stack.api_url}/v1/jobs",
                json={"request": REQ},
                headers={**h, "Idempotency-Key": "race-1"},
                timeout=30,
            )

        body = json.dumps({"custom_id": "a", "body": REQ}) + "\n"

        def post_batch(_: int) -> httpx.Response:
            return httpx.post(
                f"{stack.api_url}/v1/batches",
                content=body,
                timeout=30,
                headers={**h, "Idempotency-Key": "race-b", "Content-Type": "application/x-ndjson"},
            )

        with ThreadPoolExecutor(20) as pool:
            jobs = list(pool.map(post_job, range(20)))
            batches = list(pool.map(post_batch, range(20)))
        assert {r.status_code for r in jobs} == {202}, [r.text for r in jobs if r.status_code != 202]
        assert len({r.json()["id"] for r in jobs}) == 1
        assert {r.status_code for r in batches} == {202}, [r.text for r in batches if r.status_code != 202]
        assert len({r.json()["id"] for r in batches}) == 1
        assert _count(pg_url, Job.idempotency_key == "race-1") == 1
        assert _count(pg_url, Job.batch_id == batches[0].json()["id"]) == 1
        reuse = httpx.post(
            f"{stack.api_url}/v1/jobs",
            json={"request": {**REQ, "model": "core"}},
            headers={**h, "Idempotency-Key": "race-1"},
        )
        assert reuse.status_code == 422
    finally:
        stack.stop_all()
