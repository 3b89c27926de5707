"""A job's priority at intake, on SQLite and on the real PostgreSQL (where a batch is COPY'd):
given on a job, on a batch (JSON body or ``?priority=``) and on each of its requests, stored as
its rank and shown by the job's view."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import api.intake as intake
from api.app import create_app
from pcq.db import make_engine, make_session_factory
from pcq.models import Batch, Job, Priority
from pcq.tenants import create_key_at
from tests.api.test_api import REQ, Api
from tests.conftest import make_settings

JSONL = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as client:
        a = Api(client, create_key_at(db_url, "acme"), create_key_at(db_url, "globex"), db_url)
        a.waiting()
        yield a


def stored(api: Api, batch_id: str | None = None) -> dict[str | None, str]:
    """custom_id (or job id, for a job without one) -> the priority its row holds."""
    engine = make_engine(api.db_url)
    q = select(Job.id, Job.custom_id, Job.priority)
    if batch_id is not None:
        q = q.where(Job.batch_id == batch_id)
    with make_session_factory(engine)() as s:
        rows = s.execute(q).all()
    engine.dispose()
    return {custom_id or job_id: Priority.of_rank(rank).value for job_id, custom_id, rank in rows}


def shown(api: Api, batch_id: str) -> dict[str | None, str]:
    """custom_id -> the priority the API shows for each job of the batch."""
    page = api.client.get("/v1/jobs", params={"batch_id": batch_id, "limit": 1000}, headers=api.h()).json()
    return {j["custom_id"]: j["priority"] for j in page["data"]}


def jsonl(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(x) + "\n" for x in lines)


@pytest.mark.parametrize("given", [None, "high", "normal", "low"])
def test_a_job_has_the_priority_it_names_else_normal(api: Api, given: str | None) -> None:
    body: dict[str, Any] = {"request": REQ} if given is None else {"request": REQ, "priority": given}
    r = api.client.post("/v1/jobs", json=body, headers=api.h())
    assert r.status_code == 202, r.text
    expected = given or "normal"
    assert r.json()["priority"] == expected
    job_id = r.json()["id"]
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.h()).json()["priority"] == expected
    assert stored(api) == {job_id: expected}


def test_a_jsonl_batch_takes_the_query_priority_and_a_line_overrides_it(api: Api) -> None:
    lines = [
        {"custom_id": "own-high", "body": REQ, "priority": "high"},
        {"custom_id": "own-normal", "body": REQ, "priority": "normal"},
        {"custom_id": "inherits", "body": REQ},
        {"custom_id": "null-inherits", "body": REQ, "priority": None},
    ]
    r = api.client.post("/v1/batches?priority=low", content=jsonl(lines), headers=api.h(**JSONL))
    assert r.status_code == 202, r.text
    expected = {"own-high": "high", "own-normal": "normal", "inherits": "low", "null-inherits": "low"}
    assert stored(api, r.json()["id"]) == expected
    assert shown(api, r.json()["id"]) == expected


def test_a_jsonl_batch_without_a_query_priority_is_normal_but_its_lines_own(api: Api) -> None:
    lines = [{"custom_id": "a", "body": REQ}, {"custom_id": "b", "body": REQ, "priority": "low"}]
    r = api.client.post("/v1/batches", content=jsonl(lines), headers=api.h(**JSONL))
    assert r.status_code == 202, r.text
    assert stored(api, r.json()["id"]) == {"a": "normal", "b": "low"}


@pytest.mark.parametrize("where", ["before", "after", "twice"])
def test_a_json_batch_priority_goes_to_its_requests_that_name_none_wherever_it_stands(
    api: Api, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Named after the requests (or named again), the batch's priority reaches the requests
    already stored in earlier chunks, and only those that name none."""
    monkeypatch.setattr(intake, "CHUNK_JOBS", 2)  # 7 requests: 4 chunks, the last after the body
    own = {1: "high", 4: "normal", 6: "low"}
    requests = [
        {"custom_id": f"r{i}", "body": REQ, **({"priority": own[i]} if i in own else {})} for i in range(7)
    ]
    text = json.dumps(requests)
    body = {
        "before": '{"priority": "high", "requests": ' + text + "}",
        "after": '{"requests": ' + text + ', "priority": "high"}',
        "twice": '{"priority": "low", "requests": ' + text + ', "priority": "high"}',  # the last counts
    }[where]
    r = api.client.post("/v1/batches", content=body, headers=api.h(**{"Content-Type": "application/json"}))
    assert r.status_code == 202, r.text
    expected = {f"r{i}": own.get(i, "high") for i in range(7)}
    assert stored(api, r.json()["id"]) == expected
    assert shown(api, r.json()["id"]) == expected


def test_a_json_batch_priority_takes_the_place_of_the_query_one(api: Api) -> None:
    requests = [{"custom_id": "a", "body": REQ}]
    named = api.client.post(
        "/v1/batches?priority=low", json={"requests": requests, "priority": "high"}, headers=api.h()
    )
    unnamed = api.client.post("/v1/batches?priority=low", json={"requests": requests}, headers=api.h())
    assert named.status_code == unnamed.status_code == 202
    assert stored(api, named.json()["id"]) == {"a": "high"}
    assert stored(api, unnamed.json()["id"]) == {"a": "low"}


@pytest.mark.parametrize(
    ("path", "body", "ctype", "needle"),
    [
        ("/v1/jobs", {"request": REQ, "priority": "urgent"}, "application/json", "priority"),
        ("/v1/jobs", {"request": REQ, "priority": 0}, "application/json", "priority"),
        ("/v1/jobs", {"request": REQ, "priority": None}, "application/json", "priority"),
        (
            "/v1/batches",
            {"requests": [{"custom_id": "a", "body": REQ}], "priority": "HIGH"},
            "application/json",
            "body: priority",
        ),
        (
            "/v1/batches",
            {"requests": [{"custom_id": "a", "body": REQ}, {"custom_id": "b", "body": REQ, "priority": 1}]},
            "application/json",
            "requests[1]: priority",
        ),
        (
            "/v1/batches",
            [{"custom_id": "a", "body": REQ}, {"custom_id": "b", "body": REQ, "priority": "top"}],
            "application/x-ndjson",
            "line 2: priority",
        ),
        (
            "/v1/batches?priority=urgent",
            [{"custom_id": "a", "body": REQ}],
            "application/x-ndjson",
            "priority",
        ),
        (
            "/v1/batches?priority=low&priority=high",
            [{"custom_id": "a", "body": REQ}],
            "application/x-ndjson",
            "priority",
        ),
    ],
    ids=[
        "job-unknown",
        "job-a-rank",
        "job-null",
        "json-batch-case",
        "json-request",
        "jsonl-line",
        "query-unknown",
        "query-twice",
    ],
)
def test_an_unknown_priority_is_a_422_naming_it_and_stores_nothing(
    api: Api, path: str, body: Any, ctype: str, needle: str
) -> None:
    content = jsonl(body) if ctype == "application/x-ndjson" else json.dumps(body)
    r = api.client.post(path, content=content, headers=api.h(**{"Content-Type": ctype}))
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}
    assert r.json()["error"] == "invalid_request"
    assert needle in r.json()["detail"]
    assert api.count(Job) == 0
    assert api.count(Batch) == 0
    assert api.waiting() == []


def test_a_job_without_a_priority_and_one_with_normal_are_the_same_request(api: Api) -> None:
    h = api.h(**{"Idempotency-Key": "same"})
    first = api.client.post("/v1/jobs", json={"request": REQ}, headers=h)
    again = api.client.post("/v1/jobs", json={"request": REQ, "priority": "normal"}, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = api.client.post("/v1/jobs", json={"request": REQ, "priority": "high"}, headers=h)
    assert other.status_code == 422
    assert other.json()["error"] == "idempotency_key_reused"
    assert api.count(Job) == 1


def test_a_batch_query_priority_is_part_of_its_request_but_normal_is_no_priority(api: Api) -> None:
    h = api.h(**{**JSONL, "Idempotency-Key": "batch"})
    body = jsonl([{"custom_id": "a", "body": REQ}])
    first = api.client.post("/v1/batches", content=body, headers=h)
    again = api.client.post("/v1/batches?priority=normal", content=body, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = api.client.post("/v1/batches?priority=high", content=body, headers=h)
    assert other.status_code == 422
    assert other.json()["error"] == "idempotency_key_reused"
    assert api.count(Job) == 1
