"""The worker's metrics: bounded labels (a model no one knows is ``other``, a call without an answer
has status ``none``), the server on PCQ_METRICS_PORT, and a port in use that leaves the worker
running without it. tests/e2e/test_metrics.py checks the counts against a real run's rows."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pcq.jobs.lifecycle import AttemptRecord, ClaimedJob, Settled
from pcq.queue import make_celery
from pcq.wire import Outcome, ParsedCompletion
from shell.procs import free_port
from tests.conftest import make_settings
from worker.app import Runtime
from worker.metrics import WorkerMetrics, model_label, serve, webhook_outcome


def value(m: WorkerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def outcome(kind: str, status: int | None, seconds: float = 1.5) -> Outcome:
    start = datetime.now(UTC)
    return Outcome(kind, start, start + timedelta(seconds=seconds), status_code=status)


def test_a_model_outside_the_known_ones_is_labelled_other() -> None:
    assert model_label("core") == "core"
    assert model_label("gpt-5-turbo-" + "x" * 50) == "other"
    m = WorkerMetrics()
    m.record_call("no-such-model", outcome("fatal", 400))
    m.record_call("lite", outcome("ok", 200, seconds=2))
    assert value(m, "pcq_upstream_requests_total", model="other", outcome="fatal", status_code="400") == 1
    assert value(m, "pcq_upstream_latency_seconds_sum", model="lite") == pytest.approx(2)
    assert (
        value(m, "pcq_upstream_requests_total", model="no-such-model", outcome="fatal", status_code="400")
        is None
    )


def test_a_call_without_an_answer_has_status_none_and_a_429_is_counted_apart() -> None:
    m = WorkerMetrics()
    m.record_call("base", outcome("retryable", None))
    m.record_call("base", outcome("retryable", 429))
    assert value(m, "pcq_upstream_requests_total", model="base", outcome="retryable", status_code="none") == 1
    assert value(m, "pcq_upstream_requests_total", model="base", outcome="retryable", status_code="429") == 1
    assert value(m, "pcq_upstream_429_total") == 1


def test_tokens_count_only_answers_stored_under_the_claim() -> None:
    def answered(job_id: str, model: str) -> Settled:
        now = datetime.now(UTC)
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "x": True}
        completion = ParsedCompletion("{}", "a", None, model, "stop", None, usage)
        return Settled(
            ClaimedJob(job_id, "t", None, 1, "{}", model=model), AttemptRecord(1, now, now, "ok"), completion
        )

    m = WorkerMetrics()
    m.record_stored([answered("a", "core"), answered("b", "core"), answered("lost", "core")], {"a", "b"})
    assert value(m, "pcq_tokens_total", model="core", kind="prompt") == 20
    assert value(m, "pcq_tokens_total", model="core", kind="completion") == 10
    assert value(m, "pcq_tokens_total", model="core", kind="total") == 30


def test_webhook_outcomes_are_a_bounded_set() -> None:
    assert webhook_outcome(None, 204) == "delivered"
    assert webhook_outcome("http_410", 410) == "gone"
    assert webhook_outcome("http_503", 503) == "http_5xx"
    assert webhook_outcome("http_404", 404) == "http_4xx"
    assert webhook_outcome("timeout", None) == "timeout"
    assert webhook_outcome("something new", None) == "error"


def test_the_server_serves_the_metrics_on_its_port() -> None:
    m = WorkerMetrics()
    m.upstream_429.inc()
    port = free_port()
    server = serve(m, "127.0.0.1", port)
    assert server is not None
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"pcq_upstream_429", "pcq_calls_in_flight", "pcq_sweeper_resent", "pcq_db_write_seconds"} <= names


def test_port_0_serves_nothing() -> None:
    assert serve(WorkerMetrics(), "127.0.0.1", 0) is None


def test_a_port_in_use_is_logged_and_the_worker_runs_on(
    sqlite_url: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            DATABASE_URL=sqlite_url,
            PCQ_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
            PCQ_METRICS_HOST="127.0.0.1",
            PCQ_METRICS_PORT=port,
        )
        with caplog.at_level(logging.ERROR, logger="worker.metrics"):
            rt = Runtime(settings, make_celery(settings))
        try:
            assert rt.metrics_server is None
            assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records), caplog.text
            assert rt.engine._thread.is_alive()  # the engine (calls, sweeper) runs without metrics
        finally:
            rt.close()
