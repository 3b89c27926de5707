"""``GET /metrics`` of the API: no key needed, requests labelled by route template (never the raw
path), the fleet's gauges read from the database at most every 5 s, and a database outage never
makes a scrape fail. On SQLite; tests/e2e/test_metrics.py checks the numbers on real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from api.app import create_app
from api.intake import NewJob, create_job
from api.metrics import REFRESH_SECONDS, STALE_SECONDS, FleetCollector
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.tenants import create_key, create_key_at
from tests.conftest import make_settings

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://"))) as c:
        yield c


def test_metrics_answers_without_a_key(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
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


def test_fleet_gauges_are_read_at_most_every_5_seconds(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    now = [1000.0]
    fleet = FleetCollector(clock=lambda: now[0])

    def queued() -> float:
        fleet.refresh(sessions)
        [jobs] = [f for f in fleet.collect() if f.name == "pcq_jobs"]
        return next(s.value for s in jobs.samples if s.labels["status"] == "queued")

    assert queued() == 0
    reads = len(statements)
    assert reads > 0
    with unit_of_work(sessions) as s:
        tenant, _ = create_key(s, "t", "")
        create_job(s, tenant.id, NewJob(request_json=json.dumps(REQ), model="lite"), None)
    statements.clear()
    now[0] += REFRESH_SECONDS - 0.1
    for _ in range(20):  # scrapes within the 5 s run no query and serve the cached values
        assert queued() == 0
    assert statements == []
    now[0] += 0.2
    assert queued() == 1
    assert len(statements) == reads
    engine.dispose()


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
