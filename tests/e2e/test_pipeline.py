"""End to end on real processes: API, Celery worker and mock upstream as subprocesses.

A batch goes in over HTTP; the rows that come out are checked against what the upstream sent.
Runs on PostgreSQL + Redis (the production shape) and on SQLite + the embedded broker.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from pcq.tenants import create_key_at
from tests.audit import audit
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]

MODELS = ["lite", "base", "core", "speed"]


def batch_lines(n: int, faults: dict[int, str] | None = None) -> str:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": MODELS[i % len(MODELS)],
            "messages": [{"role": "user", "content": f"question {i} {(faults or {}).get(i, '')}".strip()}],
        }
        if i % 5 == 1:
            body["stream"] = True
        if i % 7 == 2:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"type": "string"}, "n": {"type": "integer"}},
                    },
                },
            }
        lines.append(json.dumps({"custom_id": f"item-{i}", "body": body}))
    return "\n".join(lines) + "\n"


def run_batch(stack: Stack, key: str, body: str, timeout: float = 120) -> dict[str, Any]:
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        f"{stack.api_url}/v1/batches", content=body, headers={**h, "Content-Type": "application/x-ndjson"}
    )
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = httpx.get(f"{stack.api_url}/v1/batches/{batch_id}", headers=h).json()
        if state["done"]:
            return state
        time.sleep(0.3)
    raise AssertionError(f"batch not done in {timeout} s: {state}\n{stack.logs()}")


def test_a_batch_flows_through_and_every_citation_becomes_a_row(stack: tuple[Stack, str]) -> None:
    s, db = stack
    key = create_key_at(db, "e2e")
    n = 40
    state = run_batch(s, key, batch_lines(n))
    assert state["counts"]["succeeded"] == n, s.logs()
    a = audit(db, state["id"])
    assert a.results == n
    assert a.duplicate_results == 0
    assert a.usage == n
    assert a.citations == a.citations_in_raw
    assert a.citations > 0
    assert a.attempts == n  # no faults: one upstream call per job, each recorded
    assert s.mock_stats()["requests"] == n

    # What the API serves matches the rows.
    h = {"Authorization": f"Bearer {key}"}
    lines = httpx.get(f"{s.api_url}/v1/batches/{state['id']}/results", headers=h).text.splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == [f"item-{i}" for i in range(n)]
    served = sum(len(c["citations"]) for x in lines for c in json.loads(x)["result"]["basis"])
    assert served == a.citations
    rows, cursor = [], None
    while True:
        params = {"batch_id": state["id"], "limit": 100, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{s.api_url}/v1/citations", params=params, headers=h).json()
        rows += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(rows) == a.citations
    assert len({r["id"] for r in rows}) == len(rows)


def test_retryable_failures_are_retried_recorded_and_then_succeed(stack: tuple[Stack, str]) -> None:
    s, db = stack
    key = create_key_at(db, "e2e")
    faults = {
        0: "[[mock:status=503,times=2]]",
        1: "[[mock:status=429,times=1,retry_after=1]]",
        2: "[[mock:truncate,times=1]]",
        3: "[[mock:status=401]]",
    }
    state = run_batch(s, key, batch_lines(6, faults))
    assert state["counts"] == {"queued": 0, "running": 0, "succeeded": 5, "failed": 1, "cancelled": 0}
    a = audit(db, state["id"])
    assert a.results == 5
    # 3 calls for item 0, 2 for item 1, 2 for item 2 (item 2 streams), 1 each for the rest.
    assert a.attempts == 3 + 2 + 2 + 1 + 1 + 1
    assert a.attempts == a.attempts_claimed
    h = {"Authorization": f"Bearer {key}"}
    failed = httpx.get(
        f"{s.api_url}/v1/jobs", params={"batch_id": state["id"], "status": "failed"}, headers=h
    )
    job = failed.json()["data"][0]
    assert job["custom_id"] == "item-3"
    assert job["error"].startswith("upstream answered 401")
    assert "sk-e2e-secret-key-0000" not in s.logs()
