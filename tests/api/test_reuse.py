"""``reuse`` at intake, on SQLite and on PostgreSQL (where a batch is COPY'd): given on a job, on a
batch (JSON body or ``?reuse=``) and on each of its requests, stored in seconds with the hash of
the request text; a bad duration is a 422 naming the field, and nothing is stored."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from pcq.db import make_engine, make_session_factory
from pcq.models import Batch, Job
from pcq.tenants import create_key_at
from tests.api.test_api import REQ, Api
from tests.conftest import make_settings

JSONL = {"Content-Type": "application/x-ndjson"}
DAY = 86400


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as client:
        a = Api(client, create_key_at(db_url, "acme"), create_key_at(db_url, "globex"), db_url)
        a.waiting()
        yield a


def stored(api: Api) -> dict[str | None, tuple[int | None, str | None, str]]:
    """custom_id (or job id) -> (reuse_seconds, request_sha256, request text) of its row."""
    engine = make_engine(api.db_url)
    with make_session_factory(engine)() as s:
        rows = s.execute(
            select(Job.id, Job.custom_id, Job.reuse_seconds, Job.request_sha256, Job.request_json)
        )
        out = {custom_id or job_id: (reuse, digest, text) for job_id, custom_id, reuse, digest, text in rows}
    engine.dispose()
    return out


def line(custom_id: str, **extra: Any) -> str:
    return json.dumps({"custom_id": custom_id, "body": REQ, **extra})


def test_a_job_stores_its_reuse_window_and_the_hash_of_its_request_text(api: Api) -> None:
    raw = '{"request": {"model":"lite",  "messages":[{"role":"user","content":"x"}]}, "reuse": "24h"}'
    r = api.client.post("/v1/jobs", content=raw, headers=api.h(**{"Content-Type": "application/json"}))
    assert r.status_code == 202, r.text
    plain = api.client.post("/v1/jobs", json={"request": REQ, "custom_id": "plain"}, headers=api.h())
    assert plain.status_code == 202
    rows = stored(api)
    reuse, digest, text = rows[r.json()["id"]]
    assert reuse == DAY
    assert text == '{"model":"lite",  "messages":[{"role":"user","content":"x"}]}'
    assert digest == hashlib.sha256(text.encode()).hexdigest()  # of the bytes that go upstream
    assert rows["plain"][0] is None  # no reuse unless asked for
    assert rows["plain"][1] == hashlib.sha256(rows["plain"][2].encode()).hexdigest()


def test_a_jsonl_batch_takes_the_query_reuse_and_a_line_overrides_it(api: Api) -> None:
    body = "\n".join([line("a"), line("b", reuse="15m"), line("c", reuse=None)]) + "\n"
    r = api.client.post("/v1/batches?reuse=7d", content=body, headers=api.h(**JSONL))
    assert r.status_code == 202, r.text
    rows = stored(api)
    assert {k: v[0] for k, v in rows.items()} == {"a": 7 * DAY, "b": 900, "c": 7 * DAY}
    assert len({v[1] for v in rows.values()}) == 1  # the same request text, the same hash


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_json_batch_reuse_goes_to_its_requests_that_name_none_wherever_it_stands(
    api: Api, where: str
) -> None:
    requests = [{"custom_id": "a", "body": REQ}, {"custom_id": "b", "body": REQ, "reuse": "30s"}]
    members = [("reuse", '"1h"'), ("requests", json.dumps(requests))]
    if where == "after":
        members.reverse()
    body = "{" + ",".join(f'"{k}": {v}' for k, v in members) + "}"
    r = api.client.post(
        "/v1/batches?reuse=7d", content=body, headers=api.h(**{"Content-Type": "application/json"})
    )
    assert r.status_code == 202, r.text
    assert {k: v[0] for k, v in stored(api).items()} == {"a": 3600, "b": 30}


@pytest.mark.parametrize(
    ("path", "body", "ctype", "needle"),
    [
        ("/v1/jobs", {"request": REQ, "reuse": "24"}, "application/json", "reuse"),
        ("/v1/jobs", {"request": REQ, "reuse": "31d"}, "application/json", "at most 30d"),
        ("/v1/jobs", {"request": REQ, "reuse": 3600}, "application/json", "reuse"),
        ("/v1/jobs", {"request": REQ, "reuse": "0s"}, "application/json", "more than 0"),
        ("/v1/batches", [line("a"), line("b", reuse="soon")], "application/x-ndjson", "line 2: reuse"),
        ("/v1/batches?reuse=1y", [line("a")], "application/x-ndjson", "reuse:"),
        (
            "/v1/batches",
            {"requests": [{"custom_id": "a", "body": REQ, "reuse": "-1h"}]},
            "application/json",
            "requests[0]: reuse",
        ),
        (
            "/v1/batches",
            {"requests": [{"custom_id": "a", "body": REQ}], "reuse": "1x"},
            "application/json",
            "reuse",
        ),
    ],
    ids=["job-no-unit", "job-too-long", "job-number", "job-zero", "line", "query", "json-item", "json-batch"],
)
def test_a_bad_reuse_is_a_422_naming_it_and_stores_nothing(
    api: Api, path: str, body: Any, ctype: str, needle: str
) -> None:
    content = "\n".join(body) + "\n" if ctype == "application/x-ndjson" else json.dumps(body)
    r = api.client.post(path, content=content, headers=api.h(**{"Content-Type": ctype}))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"
    assert needle in r.json()["detail"]
    assert api.count(Job) == 0
    assert api.count(Batch) == 0


def test_reuse_is_part_of_a_jobs_request_for_idempotency(api: Api) -> None:
    h = api.h(**{"Idempotency-Key": "k"})
    first = api.client.post("/v1/jobs", json={"request": REQ}, headers=h)
    assert first.status_code == 202
    again = api.client.post("/v1/jobs", json={"request": REQ, "reuse": "1h"}, headers=h)
    assert again.status_code == 422
    assert again.json()["error"] == "idempotency_key_reused"
