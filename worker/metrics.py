"""The worker's Prometheus metrics, and the small HTTP server that exposes them.

Each worker process serves its own metrics on ``PCQ_METRICS_PORT`` (``0``, the default, turns
the server off: several workers often share a host, and each needs a port of its own). The
counters live in this process, so no multiprocess mode is needed: Celery's *threads* pool runs
one engine per process (worker/app.py), and Prometheus sums the workers.

Labels are bounded on purpose: no job, tenant or batch id is ever a label, a model is one of the
upstream's known models or ``other`` (``model_label``), an upstream status is a three-digit code
or ``none``, a webhook outcome is one of ``WEBHOOK_OUTCOMES``. Each metric gets a registry of its
own per ``WorkerMetrics``, not prometheus_client's global one, so tests can build many engines
in one process.

The hot path pays a few ``labels(...).inc()`` per call (a dict lookup and a lock each); nothing
here builds a string or a dict per call beyond the label values.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from pcq.jobs.lifecycle import Settled
from pcq.wire import KNOWN_MODELS, Outcome

log = logging.getLogger(__name__)

OTHER_MODEL = "other"
NO_STATUS = "none"  # status_code of a call that got no HTTP status (timeout, connection error)
# A call takes from a second (`lite`) to several minutes (`core`).
UPSTREAM_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DB_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60)
# What a webhook delivery attempt ended as (worker/webhook_net.py's error classes, with HTTP
# statuses folded into classes so the label stays bounded).
WEBHOOK_OUTCOMES = (
    "delivered",
    "gone",
    "http_4xx",
    "http_5xx",
    "http_other",
    "redirect",
    "timeout",
    "dns",
    "connect",
    "tls",
    "protocol",
    "ssrf_refused",
    "invalid_url",
    "error",
)
SWEEP_REASONS = ("lease_expired", "broker_lost", "stale")
TOKEN_KINDS = ("prompt", "completion", "total")


def model_label(model: str) -> str:
    """The model as a label: one of the upstream's known models, anything else ``other`` (a
    client cannot add label values, whatever it submits)."""
    return model if model in KNOWN_MODELS else OTHER_MODEL


def webhook_outcome(error: str | None, status_code: int | None) -> str:
    """A delivery attempt's outcome label, from worker/webhook_net.py's error class."""
    if error is None:
        return "delivered"
    if error.startswith("http_"):
        if status_code == 410:
            return "gone"
        first = str(status_code)[:1] if status_code is not None else ""
        return {"4": "http_4xx", "5": "http_5xx"}.get(first, "http_other")
    return error if error in WEBHOOK_OUTCOMES else "error"


class WorkerMetrics:
    """Every metric one worker process exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What the global registry would have had: the process's CPU, memory, start time, GC.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.upstream_requests = Counter(
            "pcq_upstream_requests",
            "Upstream calls made, by requested model, outcome (as attempts.outcome: ok, "
            "retryable, fatal) and HTTP status (none: no answer).",
            ["model", "outcome", "status_code"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "pcq_upstream_latency_seconds",
            "Duration of upstream calls, whatever their outcome.",
            ["model"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.ratelimit_wait = Histogram(
            "pcq_ratelimit_wait_seconds",
            "Time a claimed job waited for the shared upstream rate limiter.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.calls_in_flight = Gauge(
            "pcq_calls_in_flight", "Upstream calls open in this worker now.", registry=r
        )
        self.quota_per_minute = Gauge(
            "pcq_ratelimit_quota_per_minute",
            "Upstream calls a minute this worker's key pool allows (the sum of its keys' "
            "quotas, shared by every worker: take the max across workers, never the sum).",
            registry=r,
        )
        self.upstream_429 = Counter(
            "pcq_upstream_429", "Upstream calls answered 429 (rate limited).", registry=r
        )
        self.sweeper_resent = Counter(
            "pcq_sweeper_resent",
            "Jobs the sweeper sent to the broker again, by why they were due.",
            ["reason"],
            registry=r,
        )
        self.tokens = Counter(
            "pcq_tokens",
            "Tokens of stored answers, by requested model and kind (the usage columns: prompt, "
            "completion, total; do not sum across kinds).",
            ["model", "kind"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "pcq_webhook_attempts",
            "Webhook delivery attempts, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.db_write = Histogram(
            "pcq_db_write_seconds",
            "Duration of the writer's store transactions (many outcomes each), retries included.",
            buckets=DB_WRITE_BUCKETS,
            registry=r,
        )
        # Label values known up front are exported as zeros from the start, so rate() and
        # alerts see a series before the first event.
        for reason in SWEEP_REASONS:
            self.sweeper_resent.labels(reason)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_attempts.labels(outcome)

    def record_call(self, model: str, outcome: Outcome) -> None:
        """One upstream call, counted as its attempt row will store it."""
        label = model_label(model)
        code = NO_STATUS if outcome.status_code is None else str(outcome.status_code)
        self.upstream_requests.labels(label, outcome.kind, code).inc()
        self.upstream_latency.labels(label).observe(
            (outcome.finished_at - outcome.started_at).total_seconds()
        )
        if outcome.status_code == 429:
            self.upstream_429.inc()

    def record_stored(self, items: Sequence[Settled], stored: Collection[str]) -> None:
        """The tokens of the answers a store transaction wrote: those of ``items`` that
        succeeded and whose job is among ``stored`` (a lost claim stores no answer), with the
        integers their usage rows hold (a negative count, which a counter cannot add, is left
        out)."""
        for item in items:
            usage = item.completion.usage if item.completion is not None else None
            if usage is None or item.job.id not in stored:
                continue
            label = model_label(item.job.model)
            for kind in TOKEN_KINDS:
                value = usage.get(f"{kind}_tokens")
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    self.tokens.labels(label, kind).inc(value)


def exported_metric_names() -> set[str]:
    """Every metric family a worker exports (counters without ``_total``, as prometheus_client
    names families): what ops/grafana and ops/prometheus may use (tests/ops)."""
    return {family.name for family in WorkerMetrics().registry.collect()}


def serve(metrics: WorkerMetrics, host: str, port: int) -> Any | None:
    """Serve ``metrics`` on ``host:port`` from a daemon thread; returns the server (to shut
    down), or None when the port is off (0) or cannot be bound: a worker without metrics still
    runs its jobs, so a port in use is logged as an error, not raised."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        log.error(
            "metrics server: cannot listen on %s:%d (%s); running on without metrics",
            host,
            port,
            exc.strerror or type(exc).__name__,
        )
        return None
    log.info("metrics server: listening on %s:%d", host, port)
    return server
