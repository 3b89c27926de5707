"""No input makes a 5xx: arbitrary JSON, shaped by the request models, posted to every write route.

Bodies are drawn from the JSON schemas of the API's own request models (JobCreate, BatchLine,
BatchCreate), with strings that databases refuse (NUL, unpaired surrogates) and non-ASCII text
mixed in, and sometimes any JSON value in place of a field. On the real PostgreSQL, each answer
must be: never a 5xx; a 4xx stores nothing; a 202 round-trips (what was stored reads back as it
was sent).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from api.app import create_app
from api.schemas import BatchLine, JobCreate
from pcq.db import make_engine, make_session_factory
from pcq.models import Batch, Job
from pcq.tenants import create_key_at
from tests.conftest import make_settings

pytestmark = pytest.mark.realservices

ODD = ["\x00", "a\x00b", "\ud800", "x\udfffy", "é", "東京", "\u2028", "\U0001f600", "", " ", "\\", '"']
URLS = ["https://example.com/hook", "http://127.0.0.1:9/x", "https://e.com/\x00", "ftp://x", "x" * 3000]

text = st.one_of(
    st.text(max_size=12), st.sampled_from(ODD), st.builds("".join, st.lists(st.sampled_from(ODD)))
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


def from_schema(node: dict[str, Any], defs: dict[str, Any], wild: bool) -> st.SearchStrategy[Any]:
    """Values of a pydantic JSON schema: well-shaped (strings still odd), or with ``wild`` any
    field may be any JSON value instead."""
    valid = _shaped(node, defs, wild)
    return st.one_of(valid, any_json) if wild else valid


def _shaped(node: dict[str, Any], defs: dict[str, Any], wild: bool) -> st.SearchStrategy[Any]:
    if "$ref" in node:
        return from_schema(defs[node["$ref"].rsplit("/", 1)[-1]], defs, wild)
    if "anyOf" in node:
        return st.one_of([from_schema(n, defs, wild) for n in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        required = set(node.get("required", ()))
        fields = {k: from_schema(v, defs, wild) for k, v in props.items()}
        open_ = node.get("additionalProperties", True)
        extra = st.dictionaries(text, any_json, max_size=2) if open_ or wild else None

        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            out = {k: draw(s) for k, s in fields.items() if k in required or draw(st.booleans())}
            if extra is not None and draw(st.booleans()):
                out.update(draw(extra))
            return out

        return build()
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), defs, wild), min_size=1, max_size=3)
    if kind == "string":
        return st.sampled_from(URLS) if node.get("format") == "uri" else text
    if kind == "integer":
        return st.integers()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return any_json


def model_strategy(model: Any) -> st.SearchStrategy[Any]:
    """Mostly well-shaped bodies of ``model`` (so many are accepted), and some wild ones."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    return from_schema(schema, defs, False) | from_schema(schema, defs, True)


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()  # ASCII escapes: unpaired surrogates travel as \ud800


class Probe:
    def __init__(self, client: TestClient, key: str, db_url: str) -> None:
        self.client, self.key = client, key
        self.engine = make_engine(db_url)

    def counts(self) -> tuple[int, int]:
        with make_session_factory(self.engine)() as s:
            jobs = s.scalar(select(func.count()).select_from(Job)) or 0
            batches = s.scalar(select(func.count()).select_from(Batch)) or 0
        return jobs, batches

    def post(self, path: str, body: bytes | Iterator[bytes], ctype: str = "application/json") -> Any:
        before = self.counts()
        r = self.client.post(path, content=body, headers={"x-api-key": self.key, "Content-Type": ctype})
        assert r.status_code < 500, (r.status_code, r.text, body[:500] if isinstance(body, bytes) else "")
        if r.status_code >= 400:
            assert self.counts() == before, f"a {r.status_code} stored something"
            assert set(r.json()) == {"error", "detail"}
        else:
            assert r.status_code == 202, r.text
        return r


@pytest.fixture(scope="module")
def probe(module_pg_url: str) -> Iterator[Probe]:
    pg_url = module_pg_url
    settings_ = make_settings(
        DATABASE_URL=pg_url,
        PCQ_BROKER_URL="memory://",
        PCQ_MAX_REQUEST_BYTES=65536,
        PCQ_MAX_BATCH_BYTES=BATCH_LIMIT,
        PCQ_MAX_BATCH_LINES=200,
        PCQ_UPLOAD_TIMEOUT_SECONDS=2,
    )
    with TestClient(create_app(settings_)) as client:
        p = Probe(client, create_key_at(pg_url, "props"), pg_url)
        yield p
        p.engine.dispose()


BATCH_LIMIT = 1024 * 1024


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@PROPS
@given(body=model_strategy(JobCreate))
def test_post_jobs_never_5xx_and_a_202_round_trips(probe: Probe, body: Any) -> None:
    r = probe.post("/v1/jobs", dump(body))
    if r.status_code == 202:
        job = probe.client.get(f"/v1/jobs/{r.json()['id']}", headers={"x-api-key": probe.key}).json()
        assert job["custom_id"] == body.get("custom_id")
        assert job["metadata"] == body.get("metadata")
        assert job["model"] == body["request"]["model"]
        assert job["priority"] == body.get("priority", "normal")


@PROPS
@given(lines=st.lists(model_strategy(BatchLine) | any_json, min_size=1, max_size=4))
def test_post_jsonl_batches_never_5xx_and_a_202_round_trips(probe: Probe, lines: list[Any]) -> None:
    r = probe.post("/v1/batches", b"".join(dump(x) + b"\n" for x in lines), "application/x-ndjson")
    if r.status_code == 202:
        page = probe.client.get(
            "/v1/jobs", params={"batch_id": r.json()["id"]}, headers={"x-api-key": probe.key}
        ).json()
        got = {j["custom_id"]: (j["metadata"], j["priority"]) for j in page["data"]}
        assert got == {x["custom_id"]: (x.get("metadata"), x.get("priority") or "normal") for x in lines}


# BatchCreate's own schema: its requests are BatchLines (the model reads them one by one).
json_batch = (
    st.fixed_dictionaries(
        {"requests": st.lists(model_strategy(BatchLine), min_size=1, max_size=3)},
        optional={
            "metadata": st.none() | st.dictionaries(text, any_json, max_size=3),
            "webhook_url": text,
            "priority": st.sampled_from(["high", "normal", "low"]) | any_json,
        },
    )
    | any_json
)


@PROPS
@given(body=json_batch)
def test_post_json_batches_never_5xx_and_a_202_round_trips(probe: Probe, body: Any) -> None:
    r = probe.post("/v1/batches", dump(body))
    if r.status_code == 202:
        assert r.json()["metadata"] == body.get("metadata")
        assert r.json()["total"] == len(body["requests"])
        page = probe.client.get(
            "/v1/jobs", params={"batch_id": r.json()["id"]}, headers={"x-api-key": probe.key}
        ).json()
        got = {j["custom_id"]: j["priority"] for j in page["data"]}
        batch_priority = body.get("priority", "normal")
        assert got == {x["custom_id"]: x.get("priority") or batch_priority for x in body["requests"]}


@PROPS
@given(job_id=text, action=st.sampled_from(["cancel", "retry"]))
def test_job_actions_and_lookups_with_odd_ids_never_5xx(probe: Probe, job_id: str, action: str) -> None:
    quoted = quote(job_id.encode("utf-8", "surrogatepass"), safe="")  # as a client sends it
    for r in (
        probe.client.post(f"/v1/jobs/{quoted}/{action}", headers={"x-api-key": probe.key}),
        probe.client.get(f"/v1/jobs?custom_id={quoted}&batch_id={quoted}", headers={"x-api-key": probe.key}),
        probe.client.get(f"/v1/citations?domain={quoted}&url={quoted}", headers={"x-api-key": probe.key}),
        probe.client.get(
            f"/v1/citations?field={quoted}&confidence={quoted}&custom_id={quoted}",
            headers={"x-api-key": probe.key},
        ),
        probe.client.get(f"/v1/citations?created_after={quoted}", headers={"x-api-key": probe.key}),
        probe.client.get(f"/v1/batches/{quoted}/domains?cursor={quoted}", headers={"x-api-key": probe.key}),
        probe.client.post(f"/v1/batches/{quoted}/retry-failed", headers={"x-api-key": probe.key}),
    ):
        assert r.status_code < 500, (r.status_code, r.text)


@PROPS
@given(prefix=st.text(alphabet=st.sampled_from("\x00\x7f\xe9 _abc0"), min_size=12, max_size=12))
def test_an_odd_key_is_a_401_never_a_database_error(probe: Probe, prefix: str) -> None:
    key = f"pcq_{prefix}_secret".encode("latin-1")  # a header carries bytes
    r = probe.client.get("/v1/jobs", headers={"x-api-key": key})
    assert r.status_code == 401, r.text


REQ = {"model": "lite", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"request": REQ, "custom_id": "a\x00b"}, "custom_id"),
        ({"request": REQ, "custom_id": "a\ud800"}, "custom_id"),
        ({"request": REQ, "metadata": {"k": "\udfff"}}, "metadata"),
        ({"request": {**REQ, "messages": [{"role": "user", "content": "\ud800"}]}}, "content"),
        ({"request": REQ, "metadata": {"k": 1.5e400}}, "not valid JSON"),  # Infinity
        ({"request": REQ, "webhook_url": "https://e.com/" + "x" * 2100}, "webhook_url"),
        ({"request": REQ, "metadata": json.loads('{"a":' * 900 + "1" + "}" * 900)}, "nested"),
    ],
)
def test_what_no_column_can_hold_is_a_422_naming_the_field(probe: Probe, body: Any, named: str) -> None:
    r = probe.post("/v1/jobs", dump(body))
    assert r.status_code == 422
    assert named in r.json()["detail"]


def test_nul_in_request_and_metadata_is_stored_as_sent(probe: Probe) -> None:
    body = {
        "request": {**REQ, "messages": [{"role": "user", "content": "a\x00b"}], "user": "\ud800"},
        "metadata": {"k": "\x00"},
    }
    r = probe.post("/v1/jobs", dump(body))
    assert r.status_code == 202, r.text
    assert r.json()["metadata"] == {"k": "\x00"}
    with make_session_factory(probe.engine)() as s:
        stored = s.get(Job, r.json()["id"])
        assert stored is not None
        assert stored.request_json == json.dumps(body["request"])  # the escapes, as sent


@pytest.mark.parametrize("path", ["/v1/jobs/job_%00", "/v1/jobs?custom_id=%00", "/v1/citations?domain=a%00"])
def test_a_nul_in_a_path_or_query_is_a_422_naming_it(probe: Probe, path: str) -> None:
    r = probe.client.get(path, headers={"x-api-key": probe.key})
    assert r.status_code == 422, r.text
    assert "NUL" in r.json()["detail"]


LINE = json.dumps({"custom_id": "x", "body": REQ}).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(["jsonl", "json", "job"]),
    size=st.integers(0, 2 * BATCH_LIMIT)
    | st.sampled_from([60_000, 65_536, 70_000, BATCH_LIMIT - 500, BATCH_LIMIT + 500, 2 * BATCH_LIMIT]),
    chunk=st.integers(512, 256 * 1024),
    pause=st.sampled_from([0.0, 0.0, 0.002]),
    blank=st.integers(0, 3),
)
def test_slow_and_large_bodies_never_5xx_and_a_4xx_stores_nothing(
    probe: Probe, route: str, size: int, chunk: int, pause: float, blank: int
) -> None:
    """Bodies around and over every size limit, sent in odd chunks, some slowly (chunked, no
    Content-Length, so only the streaming limits can stop them)."""
    lines = [LINE.replace(b'"x"', f'"c{i}"'.encode(), 1) for i in range(max(1, size // (len(LINE) + 8)))]
    if route == "jsonl":
        body, ctype, path = (
            b"\n".join(x + b"\n" * blank for x in lines),
            "application/x-ndjson",
            "/v1/batches",
        )
    elif route == "json":
        body, ctype, path = b'{"requests": [' + b", ".join(lines) + b"]}", "application/json", "/v1/batches"
    else:
        message = {"role": "user", "content": "y" * size}
        body, ctype, path = dump({"request": {**REQ, "messages": [message]}}), "application/json", "/v1/jobs"

    slow = pause and len(body) // chunk <= 1500  # at most ~3 s of pauses: past the 2 s deadline

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), chunk):
            if slow:
                time.sleep(pause)
            yield body[start : start + chunk]

    r = probe.post(path, chunks(), ctype)
    if r.status_code == 202:
        assert len(body) <= (BATCH_LIMIT if path == "/v1/batches" else 65536)
