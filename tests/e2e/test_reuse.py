"""Reusing paid answers end to end, on PostgreSQL + Redis with a real worker and the mock upstream:
a batch with 30% duplicate requests makes one call per distinct request, every job succeeds
with its citations; later jobs reuse, or call, as their tenant, window and option say. The
mock's request count (``/mock/stats``) is what the upstream was asked."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from pcq.tenants import create_key_at
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]

DISTINCT = 70
DUPLICATES = 30


def body_of(n: int) -> dict[str, Any]:
    return {"model": "lite", "messages": [{"role": "user", "content": f"reused question {n}"}]}


def get(stack: Stack, key: str, path: str) -> Any:
    r = httpx.get(f"{stack.api_url}{path}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def run_job(stack: Stack, key: str, body: dict[str, Any], reuse: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"request": body}
    if reuse is not None:
        payload["reuse"] = reuse
    # json.dumps, as the batch's lines were written: byte-identical requests (httpx's json= is compact).
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = httpx.post(f"{stack.api_url}/v1/jobs", content=json.dumps(payload), headers=h)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = get(stack, key, f"/v1/jobs/{r.json()['id']}")
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job not done: {job}\n{stack.logs()}")


@pytest.mark.parametrize("stack", ["postgres+redis"], indirect=True)
def test_a_batch_with_30_percent_duplicates_makes_one_call_per_distinct_request(
    stack: tuple[Stack, str], record_property: Any
) -> None:
    s, db = stack
    key = create_key_at(db, "reuser")
    # Lines 0-69 distinct; 70-99 repeat 30 of them byte for byte, spread through the batch.
    order = list(range(DISTINCT)) + [(7 * i) % DISTINCT for i in range(DUPLICATES)]
    lines = [json.dumps({"custom_id": f"line-{i}", "body": body_of(n)}) for i, n in enumerate(order)]
    # Interleaved, so duplicates arrive in the same messages and claims as their originals.
    mixed = [lines[i // 2] if i % 2 == 0 else lines[DISTINCT + i // 2] for i in range(2 * DUPLICATES)]
    mixed += lines[DUPLICATES:DISTINCT]
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    r = httpx.post(f"{s.api_url}/v1/batches?reuse=24h", content="\n".join(mixed) + "\n", headers=h)
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while not (state := get(s, key, f"/v1/batches/{batch_id}"))["done"]:
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.3)
    assert state["counts"]["succeeded"] == DISTINCT + DUPLICATES, s.logs()
    calls = s.mock_stats()["requests"]
    assert calls == DISTINCT, s.logs()
    saved = 1 - calls / (DISTINCT + DUPLICATES)
    record_property("reuse_calls", calls)
    record_property("reuse_calls_saved_share", saved)
    print(f"\nreuse: {DISTINCT + DUPLICATES} jobs, {DUPLICATES} duplicates, {calls} calls, {saved:.0%} saved")

    export = [
        json.loads(x)
        for x in httpx.get(f"{s.api_url}/v1/batches/{batch_id}/results", headers=h).text.splitlines()
    ]
    assert len(export) == DISTINCT + DUPLICATES
    reused = {e["job_id"]: e["result"]["reused_from"] for e in export if e["result"]["reused_from"]}
    assert len(reused) == DUPLICATES
    called = {e["job_id"]: e for e in export if not e["result"]["reused_from"]}
    assert set(reused.values()) <= set(called)  # each points to the call that made its answer
    by_id = {e["job_id"]: e for e in export}
    for job_id, origin in reused.items():
        mine, theirs = by_id[job_id]["result"], by_id[origin]["result"]
        assert {**mine, "reused_from": None} == theirs
        assert by_id[job_id]["custom_id"] != by_id[origin]["custom_id"]
    one = next(iter(reused))
    assert get(s, key, f"/v1/jobs/{one}")["result"] == by_id[one]["result"]
    assert get(s, key, f"/v1/jobs/{one}")["attempts"] == 0

    # Every job's citations are rows of its own, as /v1/citations serves them.
    cited: Counter[str] = Counter()
    cursor = None
    while True:
        page = get(
            s, key, f"/v1/citations?batch_id={batch_id}&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        )
        cited.update(c["job_id"] for c in page["data"])
        if not (cursor := page["next_cursor"]):
            break
    assert set(cited) == set(by_id)
    for job_id, origin in reused.items():
        assert cited[job_id] == cited[origin] > 0

    # A later job with the same request and reuse: no call.
    first_line = body_of(order[0])
    later = run_job(s, key, first_line, "24h")
    assert later["status"] == "succeeded"
    assert later["result"]["reused_from"] in called
    assert later["attempts"] == 0
    assert s.mock_stats()["requests"] == calls

    # Without reuse: a call.
    plain = run_job(s, key, first_line, None)
    assert plain["result"]["reused_from"] is None
    assert s.mock_stats()["requests"] == calls + 1

    # Another tenant's identical request: a call (answers are never shared across tenants).
    other = run_job(s, create_key_at(db, "other"), first_line, "24h")
    assert other["result"]["reused_from"] is None
    assert s.mock_stats()["requests"] == calls + 2

    # A window the earlier call is older than: a call.
    time.sleep(1.1)
    expired = run_job(s, key, body_of(order[1]), "1s")
    assert expired["result"]["reused_from"] is None
    assert s.mock_stats()["requests"] == calls + 3
