"""Cancel and re-run, through the API, with the worker's side driven by the real lifecycle."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.pool import NullPool

from api.app import create_app
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.jobs.lifecycle import AttemptRecord, ClaimedJob
from pcq.models import Job, Result, utcnow
from pcq.tenants import create_key_at
from pcq.wire import ParsedCompletion
from tests.api.test_api import REQ, Api
from tests.conftest import make_settings
from tests.core import lifecycle_helpers as one


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as client:
        a = Api(client, create_key_at(db_url, "acme"), create_key_at(db_url, "globex"), db_url)
        a.waiting()
        yield a


@functools.cache
def _factory(url: str):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(url, poolclass=NullPool))


def _sessions(api: Api):  # type: ignore[no-untyped-def]
    return _factory(api.db_url)


def _claim(api: Api, job_id: str) -> ClaimedJob | None:
    with unit_of_work(_sessions(api)) as s:
        return one.claim(s, job_id, now=utcnow(), lease_seconds=60, max_attempts=3)


def _record(n: int) -> AttemptRecord:
    now = utcnow()
    return AttemptRecord(number=n, started_at=now, finished_at=now, outcome="fatal", status_code=400)


def _fail(api: Api, job_id: str) -> None:
    job = _claim(api, job_id)
    assert job is not None
    with unit_of_work(_sessions(api)) as s:
        one.store_failure(s, job, _record(job.attempt), code="http_4xx", error="upstream answered 400")


def _submit(api: Api) -> str:
    job_id: str = api.client.post("/v1/jobs", json={"request": REQ}, headers=api.h()).json()["id"]
    return job_id


def test_a_cancelled_queued_job_is_never_claimed(api: Api) -> None:
    job_id = _submit(api)
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h())
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert _claim(api, job_id) is None
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h()).json()["status"] == "cancelled"


def test_cancel_wins_over_a_running_call_and_its_answer_is_not_stored(api: Api) -> None:
    job_id = _submit(api)
    job = _claim(api, job_id)
    assert job is not None
    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h())
    completion = ParsedCompletion(
        raw_body="{}",
        content="late",
        parsed=None,
        model="lite",
        finish_reason="stop",
        upstream_id=None,
        usage=None,
    )
    with unit_of_work(_sessions(api)) as s:
        stored = one.store_success(s, job, _record(1), completion)
    assert not stored
    with _sessions(api)() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 0
        assert s.get(Job, job_id).status == "cancelled"  # type: ignore[union-attr]


def test_a_finished_job_cannot_be_cancelled(api: Api) -> None:
    job_id = _submit(api)
    _fail(api, job_id)
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h())
    assert r.status_code == 409
    assert r.json()["error"] == "conflict"


def test_retry_requeues_a_failed_job_with_a_fresh_budget(api: Api) -> None:
    job_id = _submit(api)
    api.waiting()
    _fail(api, job_id)
    r = api.client.post(f"/v1/jobs/{job_id}/retry", headers=api.h())
    assert r.status_code == 202
    assert r.json()["status"] == "queued"
    assert r.json()["error"] is None
    assert api.waiting() == [job_id]
    again = _claim(api, job_id)
    assert again is not None
    assert again.attempt == 2  # attempt numbers keep growing; every call keeps its row
    assert not again.exhausted(2)


def test_retry_of_a_job_that_did_not_fail_answers_409(api: Api) -> None:
    job_id = _submit(api)
    assert api.client.post(f"/v1/jobs/{job_id}/retry", headers=api.h()).status_code == 409


def test_cancel_and_retry_of_another_tenants_job_answer_404(api: Api) -> None:
    job_id = _submit(api)
    other = api.h(api.other_key)
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=other).status_code == 404
    assert api.client.post(f"/v1/jobs/{job_id}/retry", headers=other).status_code == 404


def test_retry_failed_reruns_only_the_failed_items_of_a_batch(api: Api) -> None:
    lines = "\n".join(json.dumps({"custom_id": f"c{i}", "body": REQ}) for i in range(3))
    batch = api.client.post(
        "/v1/batches", content=lines, headers=api.h(**{"Content-Type": "application/x-ndjson"})
    ).json()
    ids = [
        j["id"]
        for j in api.client.get("/v1/jobs", params={"batch_id": batch["id"]}, headers=api.h()).json()["data"]
    ]
    api.waiting()
    _fail(api, ids[0])
    _fail(api, ids[1])
    r = api.client.post(f"/v1/batches/{batch['id']}/retry-failed", headers=api.h())
    assert r.status_code == 202
    assert r.json()["retried"] == 2
    assert r.json()["counts"]["queued"] == 3
    assert sorted(api.waiting()) == sorted(ids[:2])
    assert (
        api.client.post(f"/v1/batches/{batch['id']}/retry-failed", headers=api.h(api.other_key)).status_code
        == 404
    )
