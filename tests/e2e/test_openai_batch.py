"""An existing OpenAI Batch job, run here unmodified: the official ``openai`` package is the
client, against the real processes (API, worker, mock upstream) on PostgreSQL and Redis.

Upload, create, poll, download, parse: every output line's body is the upstream's answer
byte for byte as stored, the request went upstream as written, the citations are rows of
``/v1/citations`` and the batch is one of ``/v1/batches``. And cancel, a bad file, another
tenant's file."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI
from openai.types import Batch

from api.verbatim import members
from pcq.tenants import create_key_at
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]
ON_POSTGRES = pytest.mark.parametrize("stack", ["postgres+redis"], indirect=True)


def body(n: int, extra: str = "") -> str:
    """A request as a user writes it: keys out of order, a float's trailing zero, escapes."""
    return (
        '{"temperature": 0.50, "model": "lite", "messages": [{"content": '
        f'"Who founded company {n}? \\u00e9 {extra}", "role": "user"}}]}}'
    )


def line(custom_id: str, request: str) -> str:
    return (
        f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", "body": {request}}}'
    )


def client(s: Stack, key: str) -> OpenAI:
    return OpenAI(base_url=f"{s.api_url}/openai/v1", api_key=key, max_retries=0)


def create(oai: OpenAI, file_id: str) -> Batch:
    return oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")


def wait(oai: OpenAI, batch_id: str, done: tuple[str, ...], timeout: float = 60) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in done:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not {done} in {timeout} s")


def raw_bodies(db: str, batch_id: str) -> dict[str, str]:
    """The upstream answers as stored, by custom_id."""
    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://")) as conn:
        found = conn.execute(
            "SELECT j.custom_id, r.raw_body FROM jobs j JOIN results r ON r.job_id = j.id "
            "WHERE j.batch_id = %s",
            (batch_id,),
        ).fetchall()
    return dict(found)


@ON_POSTGRES
def test_the_openai_sdk_runs_a_batch_end_to_end(stack: tuple[Stack, str]) -> None:
    s, db = stack
    key = create_key_at(db, "openai-user")
    oai = client(s, key)
    lines = [line(f"req-{n}", body(n, "[[mock:record]]")) for n in range(8)]
    lines.append(line("bad-request", body(99, "[[mock:status=400]]")))
    uploaded = oai.files.create(file=("batch.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert uploaded.purpose == "batch"

    created = oai.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.status in ("in_progress", "completed")
    batch = wait(oai, created.id, ("completed",))
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        9,
        8,
        1,
    )
    assert batch.completed_at is not None
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None
    assert batch.metadata == {"job": "nightly"}

    stored = raw_bodies(db, batch.id)
    output = oai.files.content(batch.output_file_id).text
    seen = []
    for text in output.splitlines():
        parsed: dict[str, Any] = json.loads(text)
        seen.append(parsed["custom_id"])
        assert parsed["id"].startswith("batch_req_")
        assert parsed["error"] is None
        assert parsed["response"]["status_code"] == 200
        # The body's text in the line is the stored upstream answer, byte for byte (basis too).
        response_text = members(text)["response"].text
        assert members(response_text)["body"].text == stored[parsed["custom_id"]]
        assert parsed["response"]["body"]["basis"]
    assert sorted(seen) == sorted(f"req-{n}" for n in range(8))
    # Each request went upstream as the user wrote it.
    recorded = httpx.get(f"{s.mock_url}/mock/recorded").json()["bodies"]
    assert sorted(recorded) == sorted(body(n, "[[mock:record]]") for n in range(8))

    [error_line] = [json.loads(x) for x in oai.files.content(batch.error_file_id).text.splitlines()]
    assert error_line["custom_id"] == "bad-request"
    assert error_line["response"]["status_code"] == 400
    assert error_line["response"]["body"]["error"]["message"]
    assert error_line["error"] is None

    headers = {"Authorization": f"Bearer {key}"}
    v1 = httpx.get(f"{s.api_url}/v1/batches/{batch.id}", headers=headers).json()
    assert v1["counts"]["succeeded"] == 8
    assert v1["counts"]["failed"] == 1
    # Usage in OpenAI's shape (the SDK parses it) and pcq's cost, as /v1 shows them.
    assert batch.usage is not None
    assert batch.usage.input_tokens == v1["usage"]["prompt_tokens"] > 0
    assert batch.usage.output_tokens == v1["usage"]["completion_tokens"] > 0
    assert batch.usage.total_tokens == v1["usage"]["total_tokens"]
    assert (batch.model_extra or {})["cost"] == v1["cost"]
    assert v1["cost"]["spent"] > 0
    cites = httpx.get(
        f"{s.api_url}/v1/citations", params={"batch_id": batch.id, "limit": 1000}, headers=headers
    )
    rows = cites.json()["data"]
    assert rows
    assert {r["batch_id"] for r in rows} == {batch.id}
    assert {r["custom_id"] for r in rows} <= set(seen)
    assert [b.id for b in oai.batches.list()] == [batch.id]


@ON_POSTGRES
def test_a_running_batch_is_cancelled_through_the_sdk(stack: tuple[Stack, str]) -> None:
    s, db = stack
    oai = client(s, create_key_at(db, "canceller"))
    lines = [line(f"slow-{n}", body(n, "[[mock:latency_ms=1500]]")) for n in range(40)]
    file = oai.files.create(file=("slow.jsonl", "\n".join(lines).encode()), purpose="batch")
    created = oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while httpx.get(f"{s.mock_url}/mock/stats").json()["in_flight"] == 0:  # a call is running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelling = oai.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    batch = wait(oai, created.id, ("cancelled",))
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert counts.total == 40
    assert counts.completed + counts.failed == 40
    assert counts.failed > 0
    assert batch.cancelled_at is not None
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in oai.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert len(oai.files.content(batch.output_file_id or "").text.splitlines()) == counts.completed


@ON_POSTGRES
def test_a_bad_file_fails_and_another_tenants_file_is_not_found(stack: tuple[Stack, str]) -> None:
    s, db = stack
    mine, theirs = client(s, create_key_at(db, "me")), client(s, create_key_at(db, "them"))
    bad = "\n".join([line("a", body(1)), "{not json", line("a", body(2))])
    file = mine.files.create(file=("bad.jsonl", bad.encode()), purpose="batch")
    batch = mine.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None
    assert batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
    ]
    assert mine.batches.retrieve(batch.id).status == "failed"
    with pytest.raises(openai.NotFoundError):
        create(theirs, file.id)
    with pytest.raises(openai.NotFoundError):
        theirs.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.retrieve(batch.id)
