"""An answer whose strings exceed what a column or an index can hold is stored, and never takes
the rest of its write batch down with it.

A PostgreSQL btree entry holds at most 2,704 bytes: a citation URL longer than that made the
worker's COPY fail for its whole write batch (up to 200 jobs), again on every retry. The mock's
``[[mock:long_fields=4000]]`` answers with a 4,000-character citation URL, a 304-character
host, and an id, model, finish_reason and confidence of 4,000 characters.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from pcq.tenants import create_key_at
from tests.e2e.test_verbatim import wait_job
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]


def line(custom_id: str, content: str) -> str:
    body = {"model": "lite", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "body": body})


def test_long_strings_are_stored_beside_ordinary_answers(stack: tuple[Stack, str]) -> None:
    s, db = stack
    key = create_key_at(db, "long-fields")
    lines = [line(f"plain-{i}", f"ordinary question {i}") for i in range(20)]
    lines.insert(10, line("long", "a long answer [[mock:long_fields=4000]]"))
    r = httpx.post(
        f"{s.api_url}/v1/batches",
        content="\n".join(lines).encode(),
        headers={"x-api-key": key, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    headers = {"x-api-key": key}
    jobs = httpx.get(f"{s.api_url}/v1/jobs", params={"batch_id": r.json()["id"]}, headers=headers).json()
    done = {j["custom_id"]: wait_job(s, key, j["id"]) for j in jobs["data"]}
    assert {c: j["status"] for c, j in done.items()} == {c: "succeeded" for c in done}, s.logs()

    long_job = done["long"]
    noise = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(63))[:4000]
    url = "https://example.com/" + noise  # as the mock makes it: incompressible
    # The answer as the upstream sent it: every string whole.
    assert long_job["result"]["basis"][0]["citations"][0]["url"] == url
    # The citation rows hold the whole URL, and are found by it.
    found = httpx.get(f"{s.api_url}/v1/citations", params={"url": url}, headers=headers).json()["data"]
    assert [(c["job_id"], c["url"]) for c in found] == [(long_job["id"], url)]
    # The 304-character host is kept as far as its column goes (255), and still found.
    host = ".".join(["a" * 60] * 5)
    by_host = httpx.get(f"{s.api_url}/v1/citations", params={"url": f"https://{host}/page"}, headers=headers)
    [cited] = by_host.json()["data"]
    assert cited["domain"] == host[:255]
