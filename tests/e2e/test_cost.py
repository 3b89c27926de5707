"""Cost and budgets, end to end: real PostgreSQL, Redis, API, worker and mock upstream processes.

Prices are the defaults (base $10 per 1,000 requests: $0.01 a call; lite $5: $0.005). The
mock answers after LATENCY_MS, so the worker holds many calls in flight at once and a budget
is reached while calls are still running: what a budget may overshoot by.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.tenants import create_key_at, list_tenants, set_share
from tests.e2e.test_webhooks import WEBHOOK_ENV
from tests.stack import Stack, stack_env
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.e2e]

LATENCY_MS = "400"
BASE_CALL = 0.01  # USD: base at $10 per 1,000 requests
LITE_CALL = 0.005


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def stack(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    s = Stack({**stack_env(pg_url, redis_url), **WEBHOOK_ENV}, tmp_path)
    try:
        s.start_mock("--latency-ms", LATENCY_MS)
        s.start_api()
        s.start_worker()
        yield s, pg_url
    finally:
        s.stop_all()


def api(
    s: Stack, key: str, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    return httpx.request(
        method, f"{s.api_url}{path}", headers={"x-api-key": key, **(headers or {})}, timeout=30, **kw
    )


def request(model: str, content: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def wait_batch(s: Stack, key: str, batch_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch: dict[str, Any] = api(s, key, "GET", f"/v1/batches/{batch_id}").json()
        if batch["done"]:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} not done in {timeout} s\n{s.logs()}")


def sql(db: str, query: str, **params: Any) -> list[Any]:
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query), params).all())
    finally:
        engine.dispose()


def counts(db: str) -> tuple[int, int]:
    [(batches, jobs)] = sql(db, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM jobs)")
    return batches, jobs


def test_a_batch_with_retries_spends_more_than_its_estimate_and_spent_is_the_sum_of_its_attempts(
    stack: tuple[Stack, str],
) -> None:
    s, db = stack
    key = create_key_at(db, "acme")
    # 5 of 20 jobs get a 500 twice, then succeed: 15 + 5 x 3 = 30 billed calls.
    lines = [
        {
            "custom_id": f"r{i}",
            "body": request("base", f"q{i}" + (" [[mock:status=500,times=2]]" if i < 5 else "")),
        }
        for i in range(20)
    ]
    r = api(s, key, "POST", "/v1/batches", json={"requests": lines})
    assert r.status_code == 202, r.text
    batch = wait_batch(s, key, r.json()["id"])
    assert batch["counts"]["succeeded"] == 20, batch
    [(billed, summed, calls)] = sql(
        db,
        "SELECT count(*) FILTER (WHERE a.status_code IS NOT NULL), sum(a.cost), count(*) "
        "FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b",
        b=batch["id"],
    )
    [(prompt, completion, total)] = sql(
        db,
        "SELECT sum(u.prompt_tokens), sum(u.completion_tokens), sum(u.total_tokens) "
        "FROM usage u JOIN jobs j ON j.id = u.job_id WHERE j.batch_id = :b",
        b=batch["id"],
    )
    assert (billed, calls) == (30, 30)
    assert batch["cost"]["estimated"] == pytest.approx(20 * BASE_CALL)
    assert batch["cost"]["spent"] == pytest.approx(summed) == pytest.approx(30 * BASE_CALL)
    assert batch["cost"]["spent"] > batch["cost"]["estimated"]
    assert batch["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    assert total > 0
    print(f"\ncost: estimated {batch['cost']['estimated']} spent {batch['cost']['spent']} ({billed} calls)")  # noqa: T201


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_a_dry_run_validates_and_estimates_and_stores_nothing(stack: tuple[Stack, str], jsonl: bool) -> None:
    s, db = stack
    key = create_key_at(db, "acme")
    lines = [{"custom_id": f"r{i}", "body": request("base" if i % 2 else "core", f"q{i}")} for i in range(6)]
    before = counts(db)
    if jsonl:
        body = "\n".join(json.dumps(line) for line in lines).encode()
        r = api(
            s,
            key,
            "POST",
            "/v1/batches?dry_run=true&max_cost=1.5",
            content=body,
            headers={"content-type": "application/x-ndjson"},
        )
    else:
        r = api(s, key, "POST", "/v1/batches?dry_run=true", json={"requests": lines, "max_cost": 1.5})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "dry_run": True,
        "total": 6,
        "models": {"core": 3, "base": 3},
        "cost": {"estimated": pytest.approx(3 * 0.025 + 3 * BASE_CALL)},
        "max_cost": 1.5,
    }
    # A bad batch is refused as a submission would be, naming the line.
    lines.append({"custom_id": "r0", "body": request("base", "again")})
    bad = api(s, key, "POST", "/v1/batches?dry_run=true", json={"requests": lines})
    assert bad.status_code == 422
    assert "custom_id 'r0' already used" in bad.text
    assert counts(db) == before


def test_max_cost_stops_calls_and_cancels_the_rest_with_budget_exceeded_and_their_webhooks(
    stack: tuple[Stack, str], receiver: Receiver
) -> None:
    s, db = stack
    key = create_key_at(db, "acme")
    lines = [{"custom_id": f"r{i}", "body": request("base", f"q{i}")} for i in range(50)]
    body = {
        "requests": lines,
        "max_cost": 0.10,
        "webhook_url": receiver.url("/budget"),
        "webhook_events": ["job.cancelled"],
    }
    r = api(s, key, "POST", "/v1/batches", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["max_cost"] == 0.10
    batch = wait_batch(s, key, r.json()["id"])
    [(billed,)] = sql(
        db,
        "SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id "
        "WHERE j.batch_id = :b AND a.status_code IS NOT NULL",
        b=batch["id"],
    )
    [(peak,)] = sql(  # the most calls that overlapped: what could have been in flight
        db,
        "SELECT max(n) FROM (SELECT (SELECT count(*) FROM attempts b JOIN jobs jb ON jb.id = b.job_id "
        "WHERE jb.batch_id = :b AND b.started_at <= a.started_at AND b.finished_at > a.started_at) AS n "
        "FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b) x",
        b=batch["id"],
    )
    cancelled = sql(
        db, "SELECT id, error_code FROM jobs WHERE batch_id = :b AND status = 'cancelled'", b=batch["id"]
    )
    spent = batch["cost"]["spent"]
    overshoot_calls = round((spent - 0.10) / BASE_CALL)
    print(  # noqa: T201
        f"\nmax_cost 0.10: spent {spent} in {billed} calls, peak overlap {peak}, "
        f"overshoot {max(overshoot_calls, 0)} call(s), cancelled {len(cancelled)}"
    )
    assert spent <= 0.10 + peak * BASE_CALL + 1e-9
    assert spent <= 0.10 + 1e-9  # the claim counts calls in flight: no overshoot at all
    assert batch["counts"]["succeeded"] == billed == 10
    assert len(cancelled) == 40
    assert {code for _, code in cancelled} == {"budget_exceeded"}
    assert peak > 1  # calls did overlap
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = [json.loads(got.body) for got in receiver.requests if got.path == "/budget"]
        if len({e["data"]["id"] for e in events if e["type"] == "job.cancelled"}) == 40 and any(
            e["type"] == "batch.completed" for e in events
        ):
            break
        time.sleep(0.3)
    cancelled_events = {e["data"]["id"]: e["data"] for e in events if e["type"] == "job.cancelled"}
    assert set(cancelled_events) == {job_id for job_id, _ in cancelled}
    assert {d["error_code"] for d in cancelled_events.values()} == {"budget_exceeded"}
    [completed] = [e["data"] for e in events if e["type"] == "batch.completed"]
    assert completed["cost"]["spent"] == pytest.approx(spent)


def test_a_monthly_budget_stops_the_tenants_calls_and_tenants_list_shows_the_spend(
    stack: tuple[Stack, str],
) -> None:
    s, db = stack
    key = create_key_at(db, "acme")
    engine = make_engine(db)
    with unit_of_work(make_session_factory(engine)) as session:
        set_share(session, "acme", weight=None, max_share=None, monthly_budget=0.05)  # 10 lite calls
    lines = [{"custom_id": f"r{i}", "body": request("lite", f"q{i}")} for i in range(16)]
    r = api(s, key, "POST", "/v1/batches", json={"requests": lines})
    assert r.status_code == 202, r.text
    batch = wait_batch(s, key, r.json()["id"])
    assert (batch["counts"]["succeeded"], batch["counts"]["cancelled"]) == (10, 6), batch
    assert batch["cost"]["spent"] == pytest.approx(10 * LITE_CALL)
    with make_session_factory(engine)() as session:
        [acme] = list_tenants(session)
    engine.dispose()
    assert acme.monthly_budget == 0.05
    assert acme.spent_this_month == pytest.approx(0.05)
    # A single job now has no room either: it ends cancelled, never called.
    job = api(s, key, "POST", "/v1/jobs", json={"request": request("lite", "one more")}).json()
    deadline = time.monotonic() + 30
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = api(s, key, "GET", f"/v1/jobs/{job['id']}").json()
    assert (job["status"], job["error_code"], job["attempts"]) == ("cancelled", "budget_exceeded", 0)
