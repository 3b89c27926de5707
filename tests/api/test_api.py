"""The HTTP API on SQLite and on the real PostgreSQL (the broker is kombu's in-memory one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.app import create_app
from pcq.db import make_engine, make_session_factory
from pcq.models import Batch, Job, Priority
from pcq.tenants import create_key_at
from tests.api.conftest import take_waiting
from tests.conftest import make_settings

REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}


@dataclass
class Api:
    client: TestClient
    key: str
    other_key: str
    db_url: str

    def h(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}", **extra}

    def count(self, model: Any) -> int:
        engine = make_engine(self.db_url)
        with make_session_factory(engine)() as s:
            n = s.scalar(select(func.count()).select_from(model)) or 0
        engine.dispose()
        return n

    def waiting(self) -> list[str]:
        """The jobs queued for the dispatcher since the last call: taken as it takes them."""
        return take_waiting(self.client.app.state.resources.sessions)  # type: ignore[attr-defined]


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://", PCQ_MAX_REQUEST_BYTES=65536)
    with TestClient(create_app(settings)) as client:
        api = Api(client, create_key_at(db_url, "acme"), create_key_at(db_url, "globex"), db_url)
        api.waiting()  # start empty
        yield api


def test_submit_job_answers_202_and_stores_it_queued(api: Api) -> None:
    r = api.client.post(
        "/v1/jobs", json={"request": REQ, "custom_id": "c1", "metadata": {"k": 1}}, headers=api.h()
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["custom_id"] == "c1"
    assert job["metadata"] == {"k": 1}
    assert job["id"].startswith("job_")
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.h()).json()["status"] == "queued"
    assert api.count(Job) == 1


def test_submit_job_enqueues_a_message_carrying_only_the_id(api: Api) -> None:
    job = api.client.post("/v1/jobs", json={"request": REQ}, headers=api.h()).json()
    assert api.waiting() == [job["id"]]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"x-api-key": "pcq_000000000000_wrong"}],
    ids=["missing", "garbage", "unknown"],
)
def test_requests_without_a_valid_key_answer_401(api: Api, headers: dict[str, str]) -> None:
    r = api.client.post("/v1/jobs", json={"request": REQ}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert api.count(Job) == 0


def test_x_api_key_header_is_accepted(api: Api) -> None:
    r = api.client.post("/v1/jobs", json={"request": REQ}, headers={"x-api-key": api.key})
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"request": {"model": "lite", "messages": []}}, "messages"),
        ({"request": {"model": "lite", "messages": [{"role": "robot", "content": "x"}]}}, "role"),
        ({"request": {"model": "ultra", "messages": [{"role": "user", "content": "x"}]}}, "unknown model"),
        ({"request": REQ, "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"request": REQ, "surprise": 1}, "surprise"),
        ({"request": REQ, "metadata": {"big": "x" * 20000}}, "metadata"),
    ],
    ids=["no-messages", "bad-role", "unknown-model", "bad-webhook", "extra-field", "huge-metadata"],
)
def test_bad_job_input_answers_422_naming_the_problem_and_stores_nothing(
    api: Api, body: dict[str, Any], needle: str
) -> None:
    r = api.client.post("/v1/jobs", json=body, headers=api.h())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"
    assert needle in r.json()["detail"]
    assert api.count(Job) == 0
    assert api.waiting() == []


def test_oversized_job_body_answers_413(api: Api) -> None:
    body = {"request": {"model": "lite", "messages": [{"role": "user", "content": "x" * 70000}]}}
    r = api.client.post("/v1/jobs", json=body, headers=api.h())
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
    assert api.count(Job) == 0


def test_idempotency_key_replay_returns_the_same_job(api: Api) -> None:
    h = api.h(**{"Idempotency-Key": "k-1"})
    first = api.client.post("/v1/jobs", json={"request": REQ}, headers=h).json()
    second = api.client.post("/v1/jobs", json={"request": REQ}, headers=h).json()
    assert first["id"] == second["id"]
    assert api.count(Job) == 1
    assert api.waiting() == [first["id"]]


def test_idempotency_key_with_a_different_body_answers_422(api: Api) -> None:
    h = api.h(**{"Idempotency-Key": "k-2"})
    api.client.post("/v1/jobs", json={"request": REQ}, headers=h)
    other = {**REQ, "model": "base"}
    r = api.client.post("/v1/jobs", json={"request": other}, headers=h)
    assert r.status_code == 422
    assert r.json()["error"] == "idempotency_key_reused"


def test_idempotency_keys_are_scoped_per_tenant(api: Api) -> None:
    a = api.client.post("/v1/jobs", json={"request": REQ}, headers=api.h(**{"Idempotency-Key": "same"}))
    b = api.client.post(
        "/v1/jobs", json={"request": REQ}, headers=api.h(api.other_key, **{"Idempotency-Key": "same"})
    )
    assert a.json()["id"] != b.json()["id"]


def test_another_tenants_job_and_batch_answer_404(api: Api) -> None:
    job = api.client.post("/v1/jobs", json={"request": REQ}, headers=api.h()).json()
    batch = api.client.post(
        "/v1/batches",
        content=json.dumps({"custom_id": "a", "body": REQ}),
        headers=api.h(**{"Content-Type": "application/x-ndjson"}),
    ).json()
    other = api.h(api.other_key)
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert api.client.get(f"/v1/batches/{batch['id']}", headers=other).status_code == 404
    assert api.client.get(f"/v1/batches/{batch['id']}/results", headers=other).status_code == 404
    assert api.client.get(f"/v1/citations?job_id={job['id']}", headers=other).status_code == 404
    assert api.client.get(f"/v1/citations?batch_id={batch['id']}", headers=other).status_code == 404
    assert api.client.get("/v1/jobs", headers=other).json()["data"] == []


def _jsonl(lines: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def test_jsonl_batch_creates_one_job_per_line(api: Api) -> None:
    lines = [
        {"custom_id": f"c{i}", "body": REQ, "method": "POST", "url": "/v1beta/chat/completions"}
        for i in range(5)
    ]
    r = api.client.post(
        "/v1/batches", content=_jsonl(lines), headers=api.h(**{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["total"] == 5
    assert batch["counts"]["queued"] == 5
    assert batch["done"] is False
    assert api.count(Job) == 5
    assert len(api.waiting()) == 5
    got = api.client.get(f"/v1/batches/{batch['id']}", headers=api.h()).json()
    assert got["status"] == "queued"


def test_json_batch_carries_metadata_and_webhook(api: Api) -> None:
    body = {
        "requests": [{"custom_id": "a", "body": REQ}, {"custom_id": "b", "body": REQ}],
        "metadata": {"run": 7},
        "webhook_url": "https://hooks.example.com/pcq",
    }
    r = api.client.post("/v1/batches", json=body, headers=api.h())
    assert r.status_code == 202, r.text
    assert r.json()["metadata"] == {"run": 7}
    assert r.json()["webhook_url"] == "https://hooks.example.com/pcq"


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([{"custom_id": "a", "body": REQ}, {"custom_id": "a", "body": REQ}], "line 2: custom_id 'a'"),
        ([{"custom_id": "a", "body": REQ}, {"custom_id": "b"}], "line 2: body"),
        ([{"custom_id": "a", "body": REQ, "method": "GET"}], "line 1: method"),
        ([{"custom_id": "a", "body": REQ, "url": "/v1/embeddings"}], "line 1: url"),
        ([{"custom_id": "a", "body": {**REQ, "model": "nope"}}], "line 1: body.model"),
    ],
    ids=["duplicate-custom-id", "missing-body", "bad-method", "bad-url", "bad-model"],
)
def test_any_bad_batch_line_rejects_the_whole_batch_naming_the_line(
    api: Api, lines: list[dict[str, Any]], needle: str
) -> None:
    r = api.client.post(
        "/v1/batches", content=_jsonl(lines), headers=api.h(**{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert api.count(Job) == 0
    assert api.count(Batch) == 0


def test_batch_line_that_is_not_json_is_named(api: Api) -> None:
    body = json.dumps({"custom_id": "a", "body": REQ}) + "\n{not json\n"
    r = api.client.post(
        "/v1/batches", content=body, headers=api.h(**{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 422
    assert r.json()["detail"].startswith("line 2: not valid JSON (")


def test_batch_with_an_unsupported_content_type_answers_422(api: Api) -> None:
    r = api.client.post("/v1/batches", content="x", headers=api.h(**{"Content-Type": "text/plain"}))
    assert r.status_code == 422
    assert "Content-Type" in r.json()["detail"]


def test_batch_idempotency_key_replays_the_batch(api: Api) -> None:
    h = api.h(**{"Content-Type": "application/x-ndjson", "Idempotency-Key": "b-1"})
    body = _jsonl([{"custom_id": "a", "body": REQ}])
    first = api.client.post("/v1/batches", content=body, headers=h).json()
    second = api.client.post("/v1/batches", content=body, headers=h).json()
    assert first["id"] == second["id"]
    assert api.count(Job) == 1


def test_job_list_pages_with_a_cursor_and_filters(api: Api) -> None:
    ids = [
        api.client.post("/v1/jobs", json={"request": REQ, "custom_id": f"c{i}"}, headers=api.h()).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/v1/jobs", params=params, headers=api.h()).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    only = api.client.get("/v1/jobs", params={"custom_id": "c3"}, headers=api.h()).json()["data"]
    assert [j["id"] for j in only] == [ids[3]]
    assert api.client.get("/v1/jobs", params={"status": "succeeded"}, headers=api.h()).json()["data"] == []
    assert api.client.get("/v1/jobs", params={"status": "bogus"}, headers=api.h()).status_code == 422
    assert api.client.get("/v1/jobs", params={"limit": 5000}, headers=api.h()).status_code == 422


def test_healthz_and_readyz(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok"


def test_openapi_docs_are_served(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/batches",
        "/v1/batches/{batch_id}/results",
        "/v1/citations",
    ):
        assert path in spec["paths"]
    assert api.client.get("/docs").status_code == 200


def test_a_batch_over_the_line_limit_answers_413_and_stores_nothing(db_url: str) -> None:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://", PCQ_MAX_BATCH_LINES=3)
    with TestClient(create_app(settings)) as client:
        key = create_key_at(db_url, "acme")
        body = _jsonl([{"custom_id": f"c{i}", "body": REQ} for i in range(4)])
        r = client.post(
            "/v1/batches",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 413
        assert "at most 3" in r.json()["detail"]
    api = Api(client, key, key, db_url)
    assert api.count(Job) == 0
    assert api.count(Batch) == 0


def test_a_jsonl_line_longer_than_the_request_limit_answers_413(api: Api) -> None:
    huge = {
        "custom_id": "a",
        "body": {"model": "lite", "messages": [{"role": "user", "content": "x" * 70000}]},
    }
    r = api.client.post(
        "/v1/batches", content=_jsonl([huge]), headers=api.h(**{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 413
    assert "line 1" in r.json()["detail"]
    assert api.count(Batch) == 0


def test_a_streamed_batch_arriving_in_small_chunks_is_read_line_by_line(api: Api) -> None:
    body = _jsonl([{"custom_id": f"c{i}", "body": REQ} for i in range(50)]).encode()

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 7):  # cut lines at arbitrary places
            yield body[i : i + 7]

    r = api.client.post(
        "/v1/batches", content=chunks(), headers=api.h(**{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 202, r.text
    assert r.json()["total"] == 50
    ids = api.client.get(
        "/v1/jobs", params={"batch_id": r.json()["id"], "limit": 100}, headers=api.h()
    ).json()
    assert sorted(j["custom_id"] for j in ids["data"]) == sorted(f"c{i}" for i in range(50))


# --- position: jobs of other batches dispatched before a batch's first


def _jsonl_batch(api: Api, n: int, key: str | None = None) -> str:
    lines = "\n".join(json.dumps({"custom_id": f"c{i}", "body": REQ}) for i in range(n))
    r = api.client.post(
        "/v1/batches", content=lines, headers=api.h(key, **{"Content-Type": "application/x-ndjson"})
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _position(api: Api, batch_id: str, key: str | None = None) -> int | None:
    r = api.client.get(f"/v1/batches/{batch_id}", headers=api.h(key))
    assert r.status_code == 200, r.text
    return r.json()["position"]  # type: ignore[no-any-return]


def test_position_follows_the_order_and_is_null_once_the_batch_runs(api: Api) -> None:
    bulk = _jsonl_batch(api, 10)  # tenant acme
    other = _jsonl_batch(api, 3, api.other_key)  # tenant globex
    urgent = _jsonl_batch(api, 2)
    engine = make_engine(api.db_url)
    with engine.begin() as conn:  # what "priority": "high" stores
        conn.execute(update(Job).where(Job.batch_id == urgent).values(priority=Priority.HIGH.rank))
    # globex's first job: behind one turn of acme's; acme's urgent batch: behind one of globex's;
    # acme's bulk: behind its 2 urgent jobs and, meanwhile, globex's 3 (weights equal).
    assert _position(api, other, api.other_key) == 1
    assert _position(api, urgent) == 1
    assert _position(api, bulk) == 5

    api.waiting()  # the dispatcher sends them all at once: nothing of another batch was sent earlier
    assert _position(api, bulk) == 0
    with engine.begin() as conn:  # a worker claims one of bulk's jobs
        first = conn.execute(Job.__table__.select().where(Job.batch_id == bulk).limit(1)).first()
        assert first is not None
        conn.execute(update(Job).where(Job.id == first.id).values(status="running"))
    assert _position(api, bulk) is None
    engine.dispose()
