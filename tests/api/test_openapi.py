"""The OpenAPI document is complete and true.

Every ``$ref`` resolves, and schemathesis, driving the app in process (ASGI) against the real
PostgreSQL with every check on, finds no 5xx, no answer the document does not describe (status,
content type, schema, headers) and no schema-valid request rejected except for the reasons the
document gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.specs.openapi.checks as builtin_checks
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from pcq.tenants import create_key_at
from tests.conftest import make_settings

pytestmark = pytest.mark.realservices

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


# The document describes a JSONL body as an array whose items are its lines.
@schemathesis.serializer(*JSONL_TYPES)
def _write_jsonl(_: schemathesis.SerializationContext, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]  # negative cases: one line of that value
    return "".join(json.dumps(item) + "\n" for item in items).encode()


@schemathesis.deserializer(*JSONL_TYPES)
def _read_jsonl(_: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]


def _app(pg_url: str) -> FastAPI:
    # memory:// keeps the embedded broker's SQLite file out of the working directory.
    return create_app(make_settings(DATABASE_URL=pg_url, PCQ_BROKER_URL="memory://"))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_ref_resolves_and_405_names_the_allowed_methods(pg_url: str) -> None:
    with TestClient(_app(pg_url)) as client:
        doc = client.get("/openapi.json").json()
        assert [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)] == []  # OpenAPI 3.1 meta-schema
        refs = set(_refs(doc))
        assert "#/components/schemas/BatchCreate" in refs
        assert "#/components/schemas/BatchLine" in refs
        for ref in refs:
            assert _resolve(doc, ref) is not None, ref
        body = doc["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
        assert body["application/x-ndjson"]["schema"]["items"] == {"$ref": "#/components/schemas/BatchLine"}

        r = client.put("/v1/jobs")
        assert r.status_code == 405
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
        assert r.json()["error"] == "method_not_allowed"
        r = client.delete("/v1/jobs/job_x/cancel")
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"
        assert client.patch("/readyz").headers["allow"] == "GET"


def test_enums_are_declared(pg_url: str) -> None:
    with TestClient(_app(pg_url)) as client:
        doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    models = ["speed", "lite", "base", "core"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == models
    assert schemas["JobOut"]["properties"]["model"]["enum"] == models
    statuses = ["queued", "running", "succeeded", "failed", "cancelled"]
    assert _resolve(doc, schemas["JobOut"]["properties"]["status"]["$ref"])["enum"] == statuses
    batch_status = _resolve(doc, schemas["BatchOut"]["properties"]["status"]["$ref"])
    assert batch_status["enum"] == ["queued", "running", "completed"]
    (status,) = [p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"]
    assert _resolve(doc, status["schema"]["$ref"])["enum"] == statuses
    priorities = ["high", "normal", "low"]
    for model in ("JobCreate", "BatchCreate", "JobOut"):
        assert _resolve(doc, schemas[model]["properties"]["priority"]["$ref"])["enum"] == priorities
    assert schemas["JobCreate"]["properties"]["priority"]["default"] == "normal"
    assert schemas["BatchCreate"]["properties"]["priority"]["default"] == "normal"
    line = schemas["BatchLine"]["properties"]["priority"]  # absent or null: the batch's
    assert [_resolve(doc, b["$ref"])["enum"] if "$ref" in b else b for b in line["anyOf"]] == [
        priorities,
        {"type": "null"},
    ]
    (priority,) = [p for p in doc["paths"]["/v1/batches"]["post"]["parameters"] if p["name"] == "priority"]
    assert priority["in"] == "query"
    assert _resolve(doc, priority["schema"]["$ref"])["enum"] == priorities
    assert "401" not in doc["paths"]["/healthz"]["get"]["responses"]
    assert "413" not in doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


class _CurrentApp:
    """An ASGI app that forwards to the one the running test built.

    The schema is loaded when the module is imported, before any fixture; each test's app runs
    on that test's database, its lifespan driven by a TestClient (schemathesis skips the lifespan
    of an app that refuses it).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("the test's TestClient runs the lifespan")
        await self.app(scope, receive, send)


# The document does not depend on the settings (nor on the lifespan's resources).
current = _CurrentApp(create_app(make_settings(DATABASE_URL="sqlite://", PCQ_BROKER_URL="memory://")))
schema = schemathesis.openapi.from_asgi("/openapi.json", current)


@pytest.fixture
def key(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Route ``current`` to an app on the session's PostgreSQL; a key of its tenant."""
    monkeypatch.chdir(tmp_path)  # whatever the app writes beside itself stays out of the repository
    app = _app(pg_url)
    with TestClient(app):
        monkeypatch.setattr(current, "app", app)
        yield create_key_at(pg_url, "acme")  # the database is emptied after each test


# Schema-valid requests the document says are refused, and why: a JSON Schema cannot say them.
DOCUMENTED_REFUSALS = (
    "idempotency_key_reused",  # the Idempotency-Key header: same key, different body
    "cursor is not one this API returned",  # the cursor parameter: only a next_cursor we gave
    "it must be unique within the batch",  # POST /v1/batches: custom_id unique within a batch
    "characters once normalized",  # webhook_url: its length is checked as stored
    "a webhook must go to a public address",  # webhook_url: the SSRF guard (names resolve: tests/fake_dns.py)
    "must fall between years 1 and 9999 in UTC",  # created_after/before: 0001-01-01T00:00:00+01:00
    "the window must be more than 0",  # reuse: 0s has the pattern's shape
    "at most 30d",  # reuse: so has 99d
)


def positive_data_acceptance(
    ctx: Any, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """The built-in check, less the refusals the document gives a reason for."""
    try:
        return builtin_checks.positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if response.status_code == 422 and any(why in response.text for why in DOCUMENTED_REFUSALS):
            return None
        raise


def negative_data_rejection(
    ctx: Any, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """The built-in check, which does not count 413 as a refusal: a body over the size limit is
    refused with the 413 the document gives (its limit is no part of the body's schema)."""
    try:
        return builtin_checks.negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData:
        if response.status_code == 413:
            return None
        raise


# Bounded so the run takes well under two minutes on two cores; no example database in the tree.
@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_the_api_keeps_to_its_document(case: schemathesis.Case, key: str) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {key}"},
        excluded_checks=[builtin_checks.positive_data_acceptance, builtin_checks.negative_data_rejection],
        additional_checks=[positive_data_acceptance, negative_data_rejection],
    )


REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}


def test_answers_about_real_objects_keep_to_the_document(key: str) -> None:
    """What fuzzing rarely reaches (random ids find nothing): each answer about objects that
    exist, and each state conflict, is one the document describes."""
    h = {"Authorization": f"Bearer {key}"}
    doc = current.app.openapi()  # type: ignore[attr-defined]

    with TestClient(current.app) as client:

        def check(method: str, path: str, template: str, status: int, **kwargs: Any) -> Any:
            r = client.request(method, path, **kwargs)
            assert r.status_code == status, r.text
            assert str(status) in doc["paths"][template][method.lower()]["responses"]
            schema[template][method].validate_response(r)  # body (and JSONL lines) and headers
            return r

        job = check("POST", "/v1/jobs", "/v1/jobs", 202, json={"request": REQ, "custom_id": "a"}, headers=h)
        one = "/v1/jobs/{job_id}"
        check("GET", f"/v1/jobs/{job.json()['id']}", one, 200, headers=h)
        check("GET", "/v1/jobs", "/v1/jobs", 200, params={"custom_id": "a", "status": "queued"}, headers=h)
        check("POST", f"/v1/jobs/{job.json()['id']}/retry", one + "/retry", 409, headers=h)
        check("POST", f"/v1/jobs/{job.json()['id']}/cancel", one + "/cancel", 200, headers=h)
        check("POST", f"/v1/jobs/{job.json()['id']}/cancel", one + "/cancel", 200, headers=h)  # idempotent
        check("POST", f"/v1/jobs/{job.json()['id']}/retry", one + "/retry", 202, headers=h)
        check("GET", "/v1/jobs/job_nope", one, 404, headers=h)
        check("GET", "/v1/jobs", "/v1/jobs", 401)
        check("GET", "/v1/jobs", "/v1/jobs", 422, params={"status": "bogus"}, headers=h)

        jsonl = "".join(json.dumps({"custom_id": c, "body": REQ}) + "\n" for c in ("x", "y"))
        ndjson = {**h, "Content-Type": "application/x-ndjson"}
        batch = check("POST", "/v1/batches", "/v1/batches", 202, content=jsonl, headers=ndjson).json()
        check(
            "POST",
            "/v1/batches",
            "/v1/batches",
            202,
            json={"requests": [{"custom_id": "z", "body": REQ}]},
            headers=h,
        )
        check("POST", "/v1/batches", "/v1/batches", 422, content=jsonl + jsonl, headers=ndjson)
        check(
            "POST",
            "/v1/batches",
            "/v1/batches",
            422,
            content="{not json",
            headers=h | {"Content-Type": "application/json"},
        )
        bat = "/v1/batches/{batch_id}"
        check("GET", f"/v1/batches/{batch['id']}", bat, 200, headers=h)
        cancelled = client.get("/v1/jobs", params={"batch_id": batch["id"]}, headers=h).json()["data"][0]
        check("POST", f"/v1/jobs/{cancelled['id']}/cancel", one + "/cancel", 200, headers=h)
        results = check("GET", f"/v1/batches/{batch['id']}/results", bat + "/results", 200, headers=h)
        assert [line["status"] for line in _read_jsonl(None, results)] == ["queued", "cancelled"]  # type: ignore[arg-type]
        check("POST", f"/v1/batches/{batch['id']}/retry-failed", bat + "/retry-failed", 202, headers=h)
        check("GET", "/v1/batches/bat_nope/results", bat + "/results", 404, headers=h)
        check("GET", "/v1/citations", "/v1/citations", 200, params={"batch_id": batch["id"]}, headers=h)
        check("GET", "/v1/citations", "/v1/citations", 404, params={"job_id": "job_nope"}, headers=h)
        audit = {
            "custom_id": "a",
            "field": "output",
            "confidence": "low",
            "created_after": "2026-01-01T00:00:00Z",
        }
        check("GET", "/v1/citations", "/v1/citations", 200, params=audit, headers=h)
        check("GET", "/v1/citations", "/v1/citations", 422, params={"created_before": "soon"}, headers=h)
        check("GET", f"/v1/batches/{batch['id']}/domains", bat + "/domains", 200, headers=h)
        check("GET", "/v1/batches/bat_nope/domains", bat + "/domains", 404, headers=h)
        check("GET", "/healthz", "/healthz", 200)
        check("GET", "/readyz", "/readyz", 200)

        # The event stream of a batch whose every job has ended: one batch.completed, then the
        # end; given that event's id, nothing newer is left (204).
        ended = check(
            "POST",
            "/v1/batches",
            "/v1/batches",
            202,
            json={"requests": [{"custom_id": "e", "body": REQ}]},
            headers=h,
        )
        (only,) = client.get("/v1/jobs", params={"batch_id": ended.json()["id"]}, headers=h).json()["data"]
        check("POST", f"/v1/jobs/{only['id']}/cancel", one + "/cancel", 200, headers=h)
        events = bat + "/events"
        stream = check("GET", f"/v1/batches/{ended.json()['id']}/events", events, 200, headers=h)
        assert stream.headers["content-type"].startswith("text/event-stream")
        (last_id,) = [line[4:] for line in stream.text.splitlines() if line.startswith("id: ")]
        assert "event: batch.completed" in stream.text
        after = {**h, "Last-Event-ID": last_id}
        check("GET", f"/v1/batches/{ended.json()['id']}/events", events, 204, headers=after)
        check("GET", "/v1/batches/bat_nope/events", events, 404, headers=h)
