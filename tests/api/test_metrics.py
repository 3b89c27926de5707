"""``GET /metrics`` of the API: no key needed, requests labelled by route template (never the raw
path), the fleet's gauges read by a refresher thread (the ended jobs less often than the rest),
never by the scrape, and a database outage or hang never makes a scrape fail or wait. On SQLite;
tests/e2e/test_metrics.py checks the numbers on real processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, update

from api.app import create_app
from api.intake import NewJob, create_job
from api.metrics import REFRESH_SECONDS, STALE_SECONDS, FleetCollector
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.models import Batch, Job, utcnow
from pcq.tenants import create_key, create_key_at
from tests.conftest import make_settings

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def first_read(client: TestClient) -> str:
    """/metrics once the app's refresher has read the database (it starts with the app)."""
    deadline = time.monotonic() + 10
    while "pcq_jobs{" not in (text := client.get("/metrics").text):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return text


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://"))) as c:
        yield c


def test_metrics_answers_without_a_key(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(first_read(client))
    assert got[("pcq_jobs", (("status", "queued"),))] == 0
    assert got[("pcq_batches_open", ())] == 0
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_requests_are_counted_by_route_template_never_by_raw_path(
    client: TestClient, sqlite_url: str
) -> None:
    h = {"Authorization": f"Bearer {create_key_at(sqlite_url, 'acme')}"}
    assert client.get("/v1/jobs/job_one", headers=h).status_code == 404
    assert client.get("/v1/jobs/job_two", headers=h).status_code == 404
    assert client.get("/v1/jobs/job_two").status_code == 401
    assert client.get("/no/such/path/job_three").status_code == 404
    assert client.request("BREW", "/healthz").status_code == 405
    text = client.get("/metrics").text
    got = samples(text)
    route = "/v1/jobs/{job_id}"
    assert got[("pcq_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))] == 2
    assert got[("pcq_http_requests_total", (("method", "GET"), ("route", route), ("status", "401")))] == 1
    assert (
        got[("pcq_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    )
    assert (
        got[("pcq_http_requests_total", (("method", "other"), ("route", "/healthz"), ("status", "405")))] == 1
    )
    assert got[("pcq_http_request_duration_seconds_count", (("method", "GET"), ("route", route)))] == 3
    for raw in ("job_one", "job_two", "job_three", "BREW"):
        assert raw not in text


def test_a_scrape_never_reads_the_database_and_ended_jobs_are_counted_less_often(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    now = [1000.0]
    fleet = FleetCollector(totals_interval=60, clock=lambda: now[0])

    def jobs() -> dict[str, float]:
        [family] = [f for f in fleet.collect() if f.name == "pcq_jobs"]
        return {s.labels["status"]: s.value for s in family.samples}

    fleet.refresh(sessions)  # the first read counts every status
    assert jobs() == dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    with unit_of_work(sessions) as s:
        tenant, _ = create_key(s, "t", "")
        create_job(s, tenant.id, NewJob(request_json=json.dumps(REQ), model="lite"), None)
    statements.clear()
    for _ in range(20):  # scrapes serve what the refresher read, without a query
        assert jobs()["queued"] == 0
    assert statements == []
    now[0] += REFRESH_SECONDS
    fleet.refresh(sessions)
    assert jobs()["queued"] == 1
    assert not any("succeeded" in sql for sql in statements)  # the active part only
    with unit_of_work(sessions) as s:
        s.execute(update(Job).values(status="succeeded"))
    now[0] += 50
    fleet.refresh(sessions)
    assert (jobs()["queued"], jobs()["succeeded"]) == (0, 0)  # the totals are 55 s old
    now[0] += REFRESH_SECONDS
    fleet.refresh(sessions)
    assert (jobs()["queued"], jobs()["succeeded"]) == (0, 1)
    engine.dispose()


def test_the_gauges_read_what_is_not_ended_through_their_indexes(sqlite_url: str) -> None:
    """The oldest due job (never retried, or retried and due), open batches (a skip scan)."""
    sessions = make_session_factory(make_engine(sqlite_url))
    fleet = FleetCollector()
    t0 = utcnow()
    with unit_of_work(sessions) as s:
        tenant, _ = create_key(s, "t", "")
        batches = []
        for n in range(3):
            batches.append(Batch(id=f"bat_{n}", tenant_id=tenant.id, total=2))
        s.add_all(batches)
        s.flush()

        def job(n: int, batch: str | None, status: str, created: float, due: float | None = None) -> Job:
            return Job(
                id=f"job_{n}",
                tenant_id=tenant.id,
                batch_id=batch,
                request_json="{}",
                model="lite",
                status=status,
                created_at=t0 - timedelta(seconds=created),
                next_attempt_at=None if due is None else t0 - timedelta(seconds=due),
            )

        s.add_all(
            [
                job(1, "bat_0", "succeeded", 900),
                job(2, "bat_0", "queued", 100),  # waits since its submission: 100 s
                job(3, "bat_1", "running", 800),
                job(4, "bat_1", "queued", 700, due=-60),  # a retry not due yet: not late
                job(5, "bat_2", "failed", 600),
                job(6, None, "queued", 500, due=300),  # a retry due 300 s ago: the oldest
            ]
        )
    fleet.refresh(sessions)
    got = {f.name: f.samples for f in fleet.collect()}
    assert got["pcq_batches_open"][0].value == 2  # bat_0 and bat_1; bat_2 has ended
    assert 300 <= got["pcq_oldest_queued_job_age_seconds"][0].value < 330
    jobs = {s.labels["status"]: s.value for s in got["pcq_jobs"]}
    assert jobs == {"queued": 3, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 0}


def test_a_database_outage_keeps_the_last_values_for_a_while_then_leaves_them_out(sqlite_url: str) -> None:
    now = [1000.0]
    fleet = FleetCollector(clock=lambda: now[0])
    fleet.refresh(make_session_factory(make_engine(sqlite_url)))
    gone = make_session_factory(make_engine("postgresql+psycopg://postgres@127.0.0.1:9/none"))
    now[0] += REFRESH_SECONDS
    fleet.refresh(gone)  # refused: logged, and the last values stay
    assert {f.name for f in fleet.collect()} >= {"pcq_jobs", "pcq_oldest_queued_job_age_seconds"}
    now[0] += STALE_SECONDS
    fleet.refresh(gone)
    assert list(fleet.collect()) == []


def test_a_hanging_database_never_holds_a_scrape(sqlite_url: str) -> None:
    """The refresher reads on its own thread: while its read hangs, /metrics answers at once
    with the last values."""
    settings = make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://")
    app = create_app(settings)
    with TestClient(app) as client:
        fleet: FleetCollector = app.state.metrics.fleet
        first_read(client)
        hang, hanging = threading.Event(), threading.Event()
        engine = app.state.resources.db_engine

        def stall(*_: object) -> None:
            hanging.set()
            hang.wait(30)

        event.listen(engine, "before_cursor_execute", stall)
        try:
            assert hanging.wait(REFRESH_SECONDS + 5)  # the refresher is stuck in a read
            started = time.monotonic()
            r = client.get("/metrics")
            assert time.monotonic() - started < 1
            assert r.status_code == 200
            assert samples(r.text)[("pcq_jobs", (("status", "queued"),))] == 0
        finally:
            event.remove(engine, "before_cursor_execute", stall)
            hang.set()
    assert fleet._thread is None  # stopped with the app


def test_metrics_answers_200_while_the_database_is_away() -> None:
    settings = make_settings(
        DATABASE_URL="postgresql://postgres@127.0.0.1:9/none", PCQ_BROKER_URL="memory://"
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "pcq_http_requests" in names
    assert "pcq_jobs" not in names
