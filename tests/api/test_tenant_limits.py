"""Per-tenant limits (api/tenant_limits.py): the API rate limit, shared through the real Redis,
and the cap on queued jobs, checked in the transaction that queues them on the real PostgreSQL."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from sqlalchemy import func, select, update

from api.app import create_app
from api.schemas import JobCreate
from api.tenant_limits import TenantRateLimiter
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.jobs.errors import TooManyQueued
from pcq.models import Batch, Job, Tenant
from pcq.tenants import create_key_at
from tests.api.conftest import take_waiting
from tests.conftest import make_settings

pytestmark = pytest.mark.realservices

REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}
JSONL = {"Content-Type": "application/x-ndjson"}


def _h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _jsonl(n: int, prefix: str = "c") -> bytes:
    return "".join(json.dumps({"custom_id": f"{prefix}{i}", "body": REQ}) + "\n" for i in range(n)).encode()


class Db:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = make_session_factory(self.engine)

    def count(self, model: Any, **where: Any) -> int:
        with self.sessions() as s:
            query = select(func.count()).select_from(model)
            for name, value in where.items():
                query = query.where(getattr(model, name) == value)
            return s.scalar(query) or 0

    def tenant_id(self, name: str) -> str:
        with self.sessions() as s:
            return s.scalars(select(Tenant.id).where(Tenant.name == name)).one()

    def set_status(self, status: str, *job_ids: str) -> None:
        with unit_of_work(self.sessions) as s:
            s.execute(update(Job).where(Job.id.in_(job_ids)).values(status=status))


@pytest.fixture
def db(pg_url: str) -> Iterator[Db]:
    db = Db(pg_url)
    yield db
    db.engine.dispose()


@pytest.fixture
def keys(pg_url: str) -> tuple[str, str]:
    return create_key_at(pg_url, "acme"), create_key_at(pg_url, "globex")


@pytest.fixture
def apps(pg_url: str) -> Iterator[Any]:
    """``apps(**env)``: a started TestClient on the session's PostgreSQL, stopped at the end."""
    with ExitStack() as stack:

        def start(**env: Any) -> TestClient:
            settings = make_settings(DATABASE_URL=pg_url, PCQ_BROKER_URL="memory://", **env)
            return stack.enter_context(TestClient(create_app(settings)))

        yield start


def _drain_messages(client: TestClient) -> list[str]:
    """The jobs queued for the dispatcher since the last call: taken as it takes them."""
    return take_waiting(client.app.state.resources.sessions)  # type: ignore[attr-defined]


def _assert_429(r: Any, code: str) -> int:
    assert r.status_code == 429, r.text
    assert r.json()["error"] == code
    assert r.json()["detail"]
    retry_after = int(r.headers["retry-after"])  # whole seconds
    assert retry_after >= 1
    return retry_after


# --- the API rate limit -------------------------------------------------------------------


def test_the_request_after_the_limit_answers_429_and_other_tenants_are_unaffected(
    apps: Any, keys: tuple[str, str], redis_url: str, db: Db
) -> None:
    acme, globex = keys
    client = apps(REDIS_URL=redis_url, PCQ_API_RATE_LIMIT_PER_MINUTE=5)
    # Every authenticated /v1 request counts once, whatever it is or answers; the list route
    # resolves the tenant twice (its query check depends on it too) and still counts once.
    assert client.get("/v1/jobs?limit=5", headers=_h(acme)).status_code == 200
    assert client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)).status_code == 202
    assert client.get("/v1/jobs/job_nope", headers=_h(acme)).status_code == 404
    assert client.post("/v1/jobs", json={"request": {}}, headers=_h(acme)).status_code == 422
    assert client.get("/v1/citations", headers=_h(acme)).status_code == 200
    # Requests without a valid key are not any tenant's.
    assert client.get("/v1/jobs", headers=_h("pcq_000000000000_wrong")).status_code == 401

    r = client.get("/v1/jobs", headers=_h(acme))
    assert _assert_429(r, "rate_limited") <= 60
    r = client.post("/v1/batches", content=_jsonl(2), headers=_h(acme, **JSONL))
    _assert_429(r, "rate_limited")
    assert db.count(Job) == 1  # the refused batch stored nothing

    assert client.get("/v1/jobs", headers=_h(globex)).status_code == 200  # another tenant
    assert client.get("/healthz").status_code == 200  # not a /v1 route

    # One key per tenant, named by the tenant id (never the API key), expiring on its own.
    r_client = redis.Redis.from_url(redis_url)
    try:
        names = sorted(k.decode() for k in r_client.keys("pcq:api:*"))
        assert names == sorted(f"pcq:api:rl:{db.tenant_id(t)}" for t in ("acme", "globex"))
        assert all(0 < r_client.pttl(k) <= 60_001 for k in names)
        assert not any(key in name for name in names for key in (acme, globex))
    finally:
        r_client.close()


def test_two_api_processes_share_one_budget(apps: Any, keys: tuple[str, str], redis_url: str) -> None:
    acme, _ = keys
    one = apps(REDIS_URL=redis_url, PCQ_API_RATE_LIMIT_PER_MINUTE=6)
    two = apps(REDIS_URL=redis_url, PCQ_API_RATE_LIMIT_PER_MINUTE=6)
    statuses = [c.get("/v1/jobs", headers=_h(acme)).status_code for c in (one, two) * 3]
    assert statuses == [200] * 6
    _assert_429(one.get("/v1/jobs", headers=_h(acme)), "rate_limited")
    _assert_429(two.get("/v1/jobs", headers=_h(acme)), "rate_limited")


def test_retry_after_says_when_the_next_request_passes(
    apps: Any, keys: tuple[str, str], redis_url: str
) -> None:
    acme, _ = keys
    client = apps(REDIS_URL=redis_url, PCQ_API_RATE_LIMIT_PER_MINUTE=60)  # then one a second
    for _ in range(60):
        assert client.get("/v1/jobs/job_x", headers=_h(acme)).status_code == 404
    retry_after = _assert_429(client.get("/v1/jobs/job_x", headers=_h(acme)), "rate_limited")
    assert retry_after == 1
    time.sleep(retry_after)
    assert client.get("/v1/jobs/job_x", headers=_h(acme)).status_code == 404
    _assert_429(client.get("/v1/jobs/job_x", headers=_h(acme)), "rate_limited")  # one, not a burst


def test_without_redis_the_limit_holds_in_process(apps: Any, keys: tuple[str, str]) -> None:
    acme, globex = keys
    client = apps(PCQ_API_RATE_LIMIT_PER_MINUTE=3)  # embedded mode: no REDIS_URL
    assert [client.get("/v1/jobs", headers=_h(acme)).status_code for _ in range(3)] == [200] * 3
    _assert_429(client.get("/v1/jobs", headers=_h(acme)), "rate_limited")
    assert client.get("/v1/jobs", headers=_h(globex)).status_code == 200
    other = apps(PCQ_API_RATE_LIMIT_PER_MINUTE=3)  # another process would have its own budget
    assert other.get("/v1/jobs", headers=_h(acme)).status_code == 200


def test_when_redis_is_down_requests_pass_and_one_warning_is_logged(
    apps: Any, keys: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    acme, _ = keys
    # Nothing listens on port 1: every call to Redis is refused.
    client = apps(REDIS_URL="redis://127.0.0.1:1/0", PCQ_API_RATE_LIMIT_PER_MINUTE=1)
    with caplog.at_level(logging.WARNING, logger="api.tenant_limits"):
        assert [client.get("/v1/jobs", headers=_h(acme)).status_code for _ in range(5)] == [200] * 5
        assert client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)).status_code == 202
    warnings = [r for r in caplog.records if r.name == "api.tenant_limits"]
    assert len(warnings) == 1
    assert "requests pass unchecked" in warnings[0].getMessage()


def test_a_failing_limiter_is_asked_again_after_its_pause(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.down = True

        def register_script(self, _: str) -> Any:
            def run(keys: list[str], args: list[int]) -> int:
                self.calls += 1
                if self.down:
                    raise redis.ConnectionError("refused")
                return 5_000_000  # five seconds to wait

            return run

    flaky = Flaky()
    limiter = TenantRateLimiter(flaky, limit_per_minute=10, pause=0.2)
    with caplog.at_level(logging.WARNING, logger="api.tenant_limits"):
        for _ in range(10):
            limiter.check("ten_a")  # passes: fail open
        assert flaky.calls == 1  # not asked again during the pause
        time.sleep(0.25)
        limiter.check("ten_a")
        assert flaky.calls == 2
    assert len(caplog.records) == 2  # once per pause at most
    flaky.down = False
    time.sleep(0.25)
    with pytest.raises(Exception, match="retry after 5 s") as exc_info:
        limiter.check("ten_a")
    assert getattr(exc_info.value, "retry_after", None) == 5


# --- the cap on queued jobs ---------------------------------------------------------------


def test_a_batch_over_the_cap_answers_429_and_stores_nothing_until_jobs_end(
    apps: Any, keys: tuple[str, str], db: Db
) -> None:
    acme, globex = keys
    client = apps(PCQ_TENANT_MAX_QUEUED=5)
    _drain_messages(client)
    first = client.post("/v1/batches", content=_jsonl(3), headers=_h(acme, **JSONL))
    assert first.status_code == 202, first.text
    first_jobs = _drain_messages(client)
    assert len(first_jobs) == 3

    for body in (
        {"content": _jsonl(3), "headers": _h(acme, **JSONL)},  # JSONL: known only at its end
        {"json": {"requests": [{"custom_id": f"j{i}", "body": REQ} for i in range(3)]}, "headers": _h(acme)},
    ):
        r = client.post("/v1/batches", **body)
        _assert_429(r, "too_many_queued")
        assert "3 queued or running jobs" in r.json()["detail"]
    assert (db.count(Job), db.count(Batch)) == (3, 1)  # nothing stored
    assert _drain_messages(client) == []  # and nothing sent

    # Single jobs fill the cap exactly; the next is refused. Another tenant is not affected.
    assert client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)).status_code == 202
    kept = client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme, **{"Idempotency-Key": "k"}))
    assert kept.status_code == 202
    _assert_429(client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)), "too_many_queued")
    # A replay queues nothing, so the cap does not refuse it.
    again = client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme, **{"Idempotency-Key": "k"}))
    assert again.status_code == 202
    assert again.json()["id"] == kept.json()["id"]
    assert client.post("/v1/batches", content=_jsonl(5), headers=_h(globex, **JSONL)).status_code == 202
    assert db.count(Job, tenant_id=db.tenant_id("acme")) == 5

    # Running jobs count; finished and cancelled ones do not.
    db.set_status("running", first_jobs[0])
    db.set_status("succeeded", first_jobs[1])
    assert client.post(f"/v1/jobs/{first_jobs[2]}/cancel", headers=_h(acme)).status_code == 200
    r = client.post("/v1/batches", content=_jsonl(2), headers=_h(acme, **JSONL))
    assert r.status_code == 202, r.text
    _assert_429(client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)), "too_many_queued")


def test_a_batch_larger_than_the_cap_is_told_to_split(apps: Any, keys: tuple[str, str], db: Db) -> None:
    acme, _ = keys
    client = apps(PCQ_TENANT_MAX_QUEUED=4)
    r = client.post("/v1/batches", content=_jsonl(5), headers=_h(acme, **JSONL))
    _assert_429(r, "too_many_queued")
    assert "split it" in r.json()["detail"]
    assert (db.count(Job), db.count(Batch)) == (0, 0)


def test_retries_that_would_exceed_the_cap_answer_429_and_requeue_nothing(
    apps: Any, keys: tuple[str, str], db: Db
) -> None:
    acme, _ = keys
    client = apps(PCQ_TENANT_MAX_QUEUED=3)
    batch = client.post("/v1/batches", content=_jsonl(3), headers=_h(acme, **JSONL)).json()
    jobs = [j["id"] for j in client.get(f"/v1/jobs?batch_id={batch['id']}", headers=_h(acme)).json()["data"]]
    db.set_status("failed", *jobs[:2])
    for _ in range(2):
        assert client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)).status_code == 202
    _drain_messages(client)
    # Three queued: neither one failed job nor the batch's two may run again.
    _assert_429(client.post(f"/v1/jobs/{jobs[0]}/retry", headers=_h(acme)), "too_many_queued")
    _assert_429(client.post(f"/v1/batches/{batch['id']}/retry-failed", headers=_h(acme)), "too_many_queued")
    assert db.count(Job, status="failed") == 2
    assert _drain_messages(client) == []
    # Room for one: the single retry passes, the batch's (now one job) too once room is made.
    db.set_status("succeeded", jobs[2])
    r = client.post(f"/v1/jobs/{jobs[0]}/retry", headers=_h(acme))
    assert r.status_code == 202, r.text
    _assert_429(client.post(f"/v1/batches/{batch['id']}/retry-failed", headers=_h(acme)), "too_many_queued")
    db.set_status("cancelled", jobs[0])
    r = client.post(f"/v1/batches/{batch['id']}/retry-failed", headers=_h(acme))
    assert r.status_code == 202, r.text
    assert r.json()["retried"] == 1


def test_concurrent_submissions_cannot_overshoot_the_cap(apps: Any, keys: tuple[str, str], db: Db) -> None:
    acme, _ = keys
    client = apps(PCQ_TENANT_MAX_QUEUED=5)
    submitter = client.app.state.resources.submitter  # type: ignore[attr-defined]
    tenant = db.tenant_id("acme")
    body = JobCreate.model_validate({"request": REQ})
    raw = json.dumps({"request": REQ}).encode()
    outcomes: list[str] = []
    start = threading.Barrier(12)

    def submit() -> None:
        start.wait()
        try:
            submitter.submit_job(tenant, body, raw, None)
            outcomes.append("ok")
        except TooManyQueued:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 7
    assert db.count(Job) == 5


# --- both off, and the document -----------------------------------------------------------


def test_with_both_limits_off_nothing_is_limited(
    apps: Any, keys: tuple[str, str], redis_url: str, db: Db
) -> None:
    acme, _ = keys
    client = apps(REDIS_URL=redis_url)  # both default to 0
    resources = client.app.state.resources  # type: ignore[attr-defined]
    assert resources.rate_limiter is None
    assert resources.submitter.queue_cap.limit == 0
    assert all(client.get("/v1/jobs", headers=_h(acme)).status_code == 200 for _ in range(30))
    assert client.post("/v1/batches", content=_jsonl(500), headers=_h(acme, **JSONL)).status_code == 202
    assert client.post("/v1/jobs", json={"request": REQ}, headers=_h(acme)).status_code == 202
    assert db.count(Job) == 501
    r_client = redis.Redis.from_url(redis_url)
    try:
        assert r_client.keys("pcq:api:*") == []
    finally:
        r_client.close()


def test_every_authenticated_operation_declares_429_with_retry_after(apps: Any) -> None:
    doc = apps().get("/openapi.json").json()
    assert [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)] == []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1"):
                assert "429" in responses, (method, path)
                assert responses["429"]["headers"]["Retry-After"]["schema"] == {"type": "string"}
                ref = responses["429"]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorOut"
            else:
                assert "429" not in responses, (method, path)
