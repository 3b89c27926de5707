"""What goes upstream is exactly what came in, through every way of submitting, on both stacks.

The mock upstream keeps the raw bytes of requests carrying ``[[mock:record]]``; each test
compares them with the text of the ``request`` (or ``body``) object as it was submitted:
key order at every depth (``json_schema`` properties not alphabetical), integers, floats,
a 23-digit integer, a null, escapes and non-ASCII text all arrive unchanged.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from pcq.tenants import create_key_at
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]


def request_text(tag: str) -> str:
    """A request as a user might write it, with properties deliberately not in key order."""
    return (
        '{"model": "lite", "messages": [{"role": "user", "content": '
        f'"Qui a fondé Parallel ? 東京 ✓ \\u00e9\\n {tag} [[mock:record]]"'
        '}], "response_format": {"type": "json_schema", "json_schema": {"name": "company", '
        '"schema": {"type": "object", "properties": {"ceo": {"type": "string"}, '
        '"hq": {"type": "string"}, "a_founded": {"type": "integer"}}, '
        '"required": ["ceo", "hq", "a_founded"]}}}, '
        '"temperature": 1.0, "top_p": 0.50, "seed": 12345678901234567890123, "max_tokens": 100, '
        '"user": null, "stream": false}'
    )


METADATA = '{"zeta": 1, "alpha": {"y": 2.0, "b": [3, "ü"]}, "big": 123456789012345678901234567890}'


def pairs(text: str) -> Any:
    """Parsed with every object as a list of (key, value) pairs: order is part of the value."""
    return json.loads(text, object_pairs_hook=list)


def recorded(stack: Stack, tag: str) -> list[str]:
    bodies: list[str] = httpx.get(f"{stack.mock_url}/mock/recorded").json()["bodies"]
    return [b for b in bodies if tag in b]


def wait_job(stack: Stack, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(
            f"{stack.api_url}/v1/jobs/{job_id}", headers={"x-api-key": key}
        ).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not done in {timeout} s\n{stack.logs()}")


def check(stack: Stack, key: str, job_id: str, tag: str) -> None:
    job = wait_job(stack, key, job_id)
    assert job["status"] == "succeeded", job
    [sent] = recorded(stack, tag)
    assert sent == request_text(tag)  # byte for byte
    assert pairs(sent) == pairs(request_text(tag))
    # The answer follows the schema's own field order, because the upstream saw it.
    assert [b["field"] for b in job["result"]["basis"]] == ["ceo", "hq", "a_founded"]
    # Metadata comes back as given: key order at every depth and every digit.
    assert json.dumps(job["metadata"], ensure_ascii=False) == METADATA


def test_post_jobs_forwards_the_request_verbatim(stack: tuple[Stack, str]) -> None:
    s, db = stack
    key = create_key_at(db, "verbatim")
    body = f'{{"request": {request_text("via-jobs")}, "metadata": {METADATA}, "custom_id": "v1"}}'
    r = httpx.post(
        f"{s.api_url}/v1/jobs",
        content=body.encode(),
        headers={"x-api-key": key, "Content-Type": "application/json"},
    )
    assert r.status_code == 202, r.text
    assert json.dumps(r.json()["metadata"], ensure_ascii=False) == METADATA
    check(s, key, r.json()["id"], "via-jobs")


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_batches_forward_each_request_verbatim(stack: tuple[Stack, str], kind: str) -> None:
    s, db = stack
    key = create_key_at(db, "verbatim")
    tags = [f"via-{kind}-{i}" for i in range(3)]
    items = [
        f'{{"custom_id": "{t}", "method": "POST", "body": {request_text(t)}, "metadata": {METADATA}}}'
        for t in tags
    ]
    if kind == "jsonl":
        body, ctype = "\n".join(items) + "\n", "application/x-ndjson"
    else:
        body, ctype = f'{{"requests": [{", ".join(items)}], "metadata": {METADATA}}}', "application/json"
    r = httpx.post(
        f"{s.api_url}/v1/batches", content=body.encode(), headers={"x-api-key": key, "Content-Type": ctype}
    )
    assert r.status_code == 202, r.text
    if kind == "json":
        assert json.dumps(r.json()["metadata"], ensure_ascii=False) == METADATA
    jobs = httpx.get(
        f"{s.api_url}/v1/jobs", params={"batch_id": r.json()["id"]}, headers={"x-api-key": key}
    ).json()["data"]
    by_custom_id = {j["custom_id"]: j["id"] for j in jobs}
    for tag in tags:
        check(s, key, by_custom_id[tag], tag)
