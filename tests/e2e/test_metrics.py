"""The metrics tell the truth: after a run on real processes (PostgreSQL, Redis, the API, a worker
with ``PCQ_METRICS_PORT`` and the mock upstream answering 503s, a 429, a truncated stream and a
401), both endpoints are scraped, parsed with prometheus_client's parser, and every counter is
compared with the rows the run wrote: upstream calls per model, outcome and status against
``attempts``, tokens against ``usage``, webhook attempts against ``webhook_attempts``, the fleet
gauges against ``jobs`` and ``webhook_events``, and the API's requests against the calls made."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcq.tenants import create_key_at
from shell.procs import free_port, wait_http
from tests.conftest import REDIS_TEST_URL, require_redis
from tests.e2e.test_pipeline import batch_lines
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by(samples: Samples, name: str, *labels: str) -> Counter[tuple[str, ...]]:
    """The samples of ``name``, summed by ``labels`` (the others summed over), zeros left out."""
    out: Counter[tuple[str, ...]] = Counter()
    for (n, pairs), v in samples.items():
        if n == name and v:
            d = dict(pairs)
            out[tuple(d[label] for label in labels)] += v
    return out


def rows(db: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def eventually(check: Callable[[], None], timeout: float = 15) -> None:
    """The worker counts a call as it ends and its tokens as their transaction commits, a moment
    before or after the API shows the job done: give the counters a moment to agree."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def metered(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Stack, str, str]]:
    require_redis()
    env = stack_env(pg_url, REDIS_TEST_URL)
    port = free_port()
    env.update(
        PCQ_METRICS_PORT=str(port),
        PCQ_METRICS_HOST="127.0.0.1",
        PCQ_WEBHOOK_ALLOW_PRIVATE="true",
        PCQ_WEBHOOK_RETRY_SCHEDULE="0.3",
        # The API counts ended jobs at every refresh (5 s), not every 60 s, so they match too.
        PCQ_METRICS_TOTALS_SECONDS="1",
    )
    s = Stack(env, tmp_path)
    try:
        s.start_mock()
        s.start_api()
        worker_metrics = f"http://127.0.0.1:{port}/metrics"
        wait_http(worker_metrics, proc=s.start_worker())
        yield s, pg_url, worker_metrics
    finally:
        s.stop_all()


def test_both_endpoints_count_what_the_database_holds(metered: tuple[Stack, str, str]) -> None:
    s, db, worker_url = metered
    h = {"Authorization": f"Bearer {create_key_at(db, 'metrics')}"}
    faults = {
        0: "[[mock:status=503,times=2]]",
        1: "[[mock:status=429,times=1,retry_after=1]]",
        2: "[[mock:truncate,times=1]]",
        3: "[[mock:status=401]]",
    }
    r = httpx.post(
        f"{s.api_url}/v1/batches",
        content=batch_lines(12, faults),
        headers={**h, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    # A job whose webhook receiver is not there: two attempts (PCQ_WEBHOOK_RETRY_SCHEDULE), both
    # refused, then the delivery fails.
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    job = {"model": "speed", "messages": [{"role": "user", "content": "q"}]}
    r = httpx.post(f"{s.api_url}/v1/jobs", json={"request": job, "webhook_url": nobody}, headers=h)
    assert r.status_code == 202, r.text

    polls = 0
    deadline = time.monotonic() + 120
    while True:
        polls += 1
        state = httpx.get(f"{s.api_url}/v1/batches/{batch_id}", headers=h).json()
        failed_events = rows(db, "SELECT count(*) FROM webhook_events WHERE status = 'failed'")[0][0]
        if state["done"] and failed_events == 1:
            break
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.3)
    assert state["counts"]["failed"] == 1  # the 401
    assert state["counts"]["succeeded"] == 11

    def worker_agrees() -> None:
        w = scrape(worker_url)
        attempts = rows(
            db,
            "SELECT j.model, a.outcome, coalesce(a.status_code::text, 'none'), count(*)"
            " FROM attempts a JOIN jobs j ON j.id = a.job_id GROUP BY 1, 2, 3",
        )
        expected = Counter({(m, o, c): n for m, o, c, n in attempts})
        assert by(w, "pcq_upstream_requests_total", "model", "outcome", "status_code") == expected
        per_model: Counter[tuple[str, ...]] = Counter()
        for (model, _, _), n in expected.items():
            per_model[(model,)] += n
        assert by(w, "pcq_upstream_latency_seconds_count", "model") == per_model
        assert w[("pcq_upstream_429_total", ())] == sum(n for (_, _, c), n in expected.items() if c == "429")
        assert w[("pcq_ratelimit_wait_seconds_count", ())] == sum(expected.values())
        assert w[("pcq_calls_in_flight", ())] == 0
        assert w[("pcq_db_write_seconds_count", ())] >= 1
        tokens = rows(
            db,
            "SELECT j.model, sum(u.prompt_tokens), sum(u.completion_tokens), sum(u.total_tokens)"
            " FROM usage u JOIN jobs j ON j.id = u.job_id GROUP BY 1",
        )
        stored: Counter[tuple[str, ...]] = Counter()
        for model, prompt, completion, total in tokens:
            stored.update(
                {(model, "prompt"): prompt, (model, "completion"): completion, (model, "total"): total}
            )
        assert by(w, "pcq_tokens_total", "model", "kind") == stored
        hooks = rows(db, "SELECT count(*) FROM webhook_attempts")[0][0]
        assert by(w, "pcq_webhook_attempts_total", "outcome") == Counter({("connect",): hooks})

    eventually(worker_agrees)
    # The faults happened, so the comparison above covered them.
    codes = {
        c
        for (_, _, c) in by(
            scrape(worker_url), "pcq_upstream_requests_total", "model", "outcome", "status_code"
        )
    }
    assert {"200", "401", "429", "503"} <= codes

    def fleet_agrees() -> None:  # the API's refresher reads the database every 5 s
        api = scrape(f"{s.api_url}/metrics")
        jobs = Counter({(st,): n for st, n in rows(db, "SELECT status, count(*) FROM jobs GROUP BY 1")})
        assert by(api, "pcq_jobs", "status") == jobs
        assert api[("pcq_batches_open", ())] == 0
        assert api[("pcq_oldest_queued_job_age_seconds", ())] == 0
        events = Counter(
            {(st,): n for st, n in rows(db, "SELECT status, count(*) FROM webhook_events GROUP BY 1")}
        )
        assert by(api, "pcq_webhook_deliveries", "status") == events

    eventually(fleet_agrees)
    api = scrape(f"{s.api_url}/metrics")
    http = by(api, "pcq_http_requests_total", "method", "route", "status")
    assert http[("POST", "/v1/batches", "202")] == 1
    assert http[("POST", "/v1/jobs", "202")] == 1
    assert http[("GET", "/v1/batches/{batch_id}", "200")] == polls
    assert (
        by(api, "pcq_http_request_duration_seconds_count", "method", "route")[
            ("GET", "/v1/batches/{batch_id}")
        ]
        == polls
    )
    assert not any(batch_id in route for (_, route, _) in http)
