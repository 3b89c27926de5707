"""Structured logs on real processes (PostgreSQL + Redis): with PCQ_LOG_FORMAT=json every line
the API and the worker write is one JSON object, uvicorn's and Celery's included, and one job
can be followed by its request id from the API's accept line to the worker's stored line."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pcq.tenants import create_key_at
from tests.conftest import REDIS_TEST_URL, require_redis
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e]

GENERATED = re.compile(r"[0-9a-f]{32}")
SECRET_KEY = "sk-e2e-secret-key-0000"  # stack_env's upstream key


@pytest.fixture
def json_stack(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Stack]:  # noqa: ARG001
    require_redis()
    env = stack_env(pg_url, REDIS_TEST_URL)
    env["PCQ_LOG_FORMAT"] = "json"
    s = Stack(env, tmp_path)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        yield s
    finally:
        s.stop_all()


def events(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's log, parsed: a line that is not a JSON object fails the test.
    A last line still being written (no newline yet) is left for the next read."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    out = []
    for n, line in enumerate(complete.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name} line {n} is not JSON: {line!r}")
        assert isinstance(event, dict), line
        assert {"ts", "level", "logger", "msg"} <= event.keys(), line
        out.append(event)
    return out


def wait_for_line(path: Path, msg: str, job_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("msg") == msg and e.get("job_id") == job_id for e in events(path)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {msg!r} line for {job_id} in {path.name}")


def test_one_job_is_followed_by_its_request_id_from_api_to_worker(json_stack: Stack, pg_url: str) -> None:
    s = json_stack
    key = create_key_at(pg_url, "logs")
    rid = f"e2e-{uuid.uuid4().hex[:12]}"
    body = {"request": {"model": "base", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}}
    r = httpx.post(
        f"{s.api_url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}", "X-Request-ID": rid}
    )
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == rid
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while True:
        job = httpx.get(f"{s.api_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] == "succeeded" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", s.logs()
    cited = sum(len(b["citations"]) for b in job["result"]["basis"])
    assert cited > 0
    wait_for_line(s.log("worker"), "stored", job_id)

    api, worker = events(s.log("api")), events(s.log("worker"))
    # uvicorn's and Celery's own lines went through the same formatter.
    assert any(e["logger"].startswith("uvicorn") for e in api)
    assert any(e["logger"].startswith("celery") for e in worker)

    api_lines = [e for e in api if e.get("job_id") == job_id]
    worker_lines = [e for e in worker if e.get("job_id") == job_id]
    accepted = [e for e in api_lines if e["msg"] == "job accepted"]
    assert len(accepted) == 1
    tenant = accepted[0]["tenant"]
    assert tenant
    access = [e for e in api_lines if e["logger"] == "uvicorn.access" and "POST /v1/jobs" in e["msg"]]
    assert len(access) == 1
    assert " 202" in access[0]["msg"]
    for e in api_lines:
        assert (e["request_id"], e["tenant"]) == (rid, tenant), e
    # At INFO, one line per call: how the call went and what was stored ("claimed" and "upstream
    # call done" are DEBUG lines).
    assert [e["msg"] for e in worker_lines] == ["stored"], worker_lines
    for e in worker_lines:
        assert (e["request_id"], e["tenant"], e["attempt"]) == (rid, tenant, 1), e
    stored = worker_lines[0]
    assert (stored["status_code"], stored["outcome"], stored["status"]) == (200, "ok", "succeeded")
    assert stored["latency_ms"] >= 0
    assert stored["citations"] == cited

    # A JSONL batch (its jobs stored by COPY) carries its request's id into the worker too.
    brid = f"batch-{uuid.uuid4().hex[:12]}"
    lines = "".join(json.dumps({"custom_id": f"c{i}", "body": body["request"]}) + "\n" for i in range(2))
    r = httpx.post(
        f"{s.api_url}/v1/batches",
        content=lines,
        headers={
            "Authorization": f"Bearer {key}",
            "X-Request-ID": brid,
            "Content-Type": "application/x-ndjson",
        },
    )
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stored_b = [
            e for e in events(s.log("worker")) if e.get("batch_id") == batch_id and e["msg"] == "stored"
        ]
        if len(stored_b) == 2:
            break
        time.sleep(0.2)
    assert len(stored_b) == 2, s.logs()
    assert {(e["request_id"], e["tenant"], e["status"]) for e in stored_b} == {(brid, tenant, "succeeded")}
    assert len({e["job_id"] for e in stored_b}) == 2
    (accepted_b,) = [e for e in events(s.log("api")) if e["msg"] == "batch accepted"]
    assert (accepted_b["request_id"], accepted_b["batch_id"], accepted_b["jobs"]) == (brid, batch_id, 2)

    # No line says the upstream key or the tenant's key.
    for path in (s.log("api"), s.log("worker")):
        text = path.read_text()
        assert SECRET_KEY not in text
        assert key not in text
    # Shutting down writes JSON too (Celery's own "Warm shutdown" text included).
    s.stop_all()
    assert any("shutdown" in e["msg"] for e in events(s.log("worker")))
    assert any("Shutting down" in e["msg"] for e in events(s.log("api")))
    for path in (s.log("api"), s.log("worker")):  # stopped: every line is whole
        assert path.read_text().endswith("\n"), path.name
    # A clean run and a clean shutdown say nothing an operator must look at.
    alarming = [e for p in (s.log("api"), s.log("worker")) for e in events(p) if e["level"] == "ERROR"]
    assert not alarming, alarming
    # The trail of one job, kept beside the logs (the closing note of issue 13 shows it).
    trail = sorted(api_lines + worker_lines, key=lambda e: str(e["ts"]))
    (s.workdir / "one_job.jsonl").write_text("".join(json.dumps(e) + "\n" for e in trail))


def test_a_request_id_is_generated_when_none_or_an_insane_one_is_sent(json_stack: Stack) -> None:
    s = json_stack
    url = f"{s.api_url}/v1/jobs"
    sent = {
        "none": None,
        "too long": "a" * 65,
        "a space": "two words",
        "a quote": 'x"y',
        "a tab": "x\ty",
        "non-ASCII": "caf\u00e9",
    }
    seen = set()
    for what, value in sent.items():
        headers = {} if value is None else {"X-Request-ID": value.encode()}
        r = httpx.post(url, json={}, headers=headers)  # no key: a 401, which carries it too
        assert r.status_code == 401, what
        echoed = r.headers["x-request-id"]
        assert GENERATED.fullmatch(echoed), (what, echoed)
        seen.add(echoed)
    assert len(seen) == len(sent)  # a new one each time
    sane = "Trace_1.2-3" + "x" * 53  # 64 characters: the longest kept
    r = httpx.get(f"{s.api_url}/v1/nowhere", headers={"X-Request-ID": sane})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == sane
    # Each 401 has its access line, with the id its response gave.
    access = [e for e in events(s.log("api")) if e["logger"] == "uvicorn.access"]
    assert seen <= {e.get("request_id") for e in access}
