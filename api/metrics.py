"""The API's Prometheus metrics: its HTTP requests, and the fleet's gauges read from the database.

``GET /metrics`` has no authentication, like ``/healthz``: keep it on an internal network (the
README's "Metrics" says how). It serves

- ``pcq_http_requests_total{method,route,status}`` and
  ``pcq_http_request_duration_seconds{method,route}``, counted by ``HttpMetrics``, a plain ASGI
  middleware. ``route`` is the route's template (``/v1/jobs/{job_id}``), never the raw path,
  ``unmatched`` for a path no route has; ``method`` is a standard method or ``other``: no client
  can add label values. The duration runs until the response's headers are sent, so an event
  stream or a long export counts its time to first byte, not how long it was read.
- ``pcq_jobs{status}``, ``pcq_oldest_queued_job_age_seconds``, ``pcq_batches_open`` and
  ``pcq_webhook_deliveries{status}``, which every API process reads from the shared database
  (pcq/repositories/fleet.py) on a thread of its own, ``FleetCollector``'s refresher: the queued
  and running jobs, the oldest due job, the open batches and the pending deliveries every
  ``REFRESH_SECONDS``, the ended jobs and deliveries (a count as long as the history) every
  ``PCQ_METRICS_TOTALS_SECONDS``. A scrape only serves what the refresher read, so a database
  that hangs (a failover that drops packets) never holds it past Prometheus' scrape timeout: the
  last values are served for up to ``STALE_SECONDS``, then the gauges are left out.

Each app has a registry of its own (not prometheus_client's global one), so many apps can live
in one process, as they do in the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcq.db import SessionFactory
from pcq.models import ACTIVE_STATUSES, JobStatus, utcnow
from pcq.models.delivery import DeliveryStatus
from pcq.repositories.fleet import ActiveGauges, Totals, read_active, read_totals

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # the fleet's active gauges are read from the database this often
TOTALS_SECONDS = 60.0  # and the ended jobs and deliveries counted this often (the default)
STALE_SECONDS = 60.0  # while the database is away, the last values are served this long
UNMATCHED = "unmatched"
METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# The fleet's gauges, as FleetCollector.collect names them.
FLEET_METRICS = (
    "pcq_jobs",
    "pcq_oldest_queued_job_age_seconds",
    "pcq_batches_open",
    "pcq_webhook_deliveries",
)


class FleetCollector(Collector):
    """The fleet's gauges, as the last reads found them. ``refresh`` reads the database (what
    the refresher thread ``start`` runs every ``interval`` s does, and what tests call to step
    it); ``collect`` (a scrape) never does."""

    def __init__(
        self,
        *,
        interval: float = REFRESH_SECONDS,
        totals_interval: float = TOTALS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.totals_interval = totals_interval
        self._clock = clock
        self._active: ActiveGauges | None = None
        self._active_at = 0.0  # clock of the last good read of the active part
        self._totals: Totals | None = None
        self._totals_at = 0.0  # clock of the last good read of the totals
        self._totals_tried_at: float | None = None  # a failed read waits out the interval too
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self, sessions: SessionFactory) -> None:
        """Read the active part, and the totals if they are ``totals_interval`` old. A failed
        read is logged and leaves the last values in place."""
        now = self._clock()
        try:
            with sessions() as session:
                self._active = read_active(session, now=utcnow())
            self._active_at = now
        except Exception as exc:
            log.warning("metrics: could not read the fleet's gauges (%s)", type(exc).__name__)
            return
        if self._totals_tried_at is not None and now - self._totals_tried_at < self.totals_interval:
            return
        self._totals_tried_at = now
        try:
            with sessions() as session:
                self._totals = read_totals(session)
            self._totals_at = now
        except Exception as exc:
            log.warning("metrics: could not count the ended jobs (%s)", type(exc).__name__)

    def start(self, sessions: SessionFactory) -> None:
        """Refresh now and every ``interval`` s on a daemon thread, until ``stop``."""

        def run() -> None:
            while not self._stop.is_set():
                self.refresh(sessions)
                self._stop.wait(self.interval)

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="pcq-fleet-gauges", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the refresher; a read hung on a dead connection is not waited for past
        ``timeout`` (the thread is a daemon: it does not hold the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def collect(self) -> Iterator[Metric]:
        active, now = self._active, self._clock()
        if active is None or now - self._active_at > STALE_SECONDS:
            return
        totals = self._totals
        if totals is not None and now - self._totals_at > self.totals_interval + STALE_SECONDS:
            totals = None  # the ended jobs' counts are left out, as every gauge is when stale
        jobs = GaugeMetricFamily("pcq_jobs", "Jobs in the database, by status.", labels=["status"])
        for status in JobStatus:
            if status in ACTIVE_STATUSES:
                jobs.add_metric([status.value], active.jobs.get(status.value, 0))
            elif totals is not None:
                jobs.add_metric([status.value], totals.jobs.get(status.value, 0))
        yield jobs
        age = 0.0
        if active.oldest_due_at is not None:
            age = max((utcnow() - active.oldest_due_at).total_seconds(), 0.0)
        yield GaugeMetricFamily(
            "pcq_oldest_queued_job_age_seconds",
            "How long the oldest queued job that may run now has waited since it became due "
            "(submitted, or its retry time came); 0 when none waits.",
            value=age,
        )
        yield GaugeMetricFamily(
            "pcq_batches_open", "Batches with a queued or running job.", value=active.batches_open
        )
        deliveries = GaugeMetricFamily(
            "pcq_webhook_deliveries", "Webhook events in the outbox, by status.", labels=["status"]
        )
        for d in DeliveryStatus:
            if d == DeliveryStatus.PENDING:
                deliveries.add_metric([d.value], active.deliveries.get(d.value, 0))
            elif totals is not None:
                deliveries.add_metric([d.value], totals.deliveries.get(d.value, 0))
        yield deliveries


class ApiMetrics:
    """One app's metrics, on a registry of its own."""

    def __init__(self, fleet: FleetCollector | None = None) -> None:
        self.registry = CollectorRegistry()
        # What the global registry would have had: the process's CPU, memory, start time, GC.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "pcq_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "pcq_http_request_duration_seconds",
            "Time until a response's headers were sent, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fleet = fleet or FleetCollector()
        self.registry.register(self.fleet)


def exported_metric_names() -> set[str]:
    """Every metric family the API exports (counters without ``_total``, as prometheus_client
    names families): what ops/grafana and ops/prometheus may use (tests/ops)."""
    return {family.name for family in ApiMetrics().registry.collect()} | set(FLEET_METRICS)


def route_template(app: Any, scope: Scope) -> str:
    """The template of the route that answered (``/v1/jobs/{job_id}``), or ``unmatched``."""
    route = scope.get("route")
    if route is None:  # answered before routing (a body limit, a NUL): ask the router
        # (FastAPI 0.16x nests included routers, whose matches() does not name the route: then
        # such a request is counted as ``unmatched``)
        partial = None
        for candidate in app.router.routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate  # the path matches, the method does not (a 405)
        route = route or partial
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetrics:
    """Counts every HTTP request by method, route template and status, and times it until its
    response's headers are sent. A request that raises before answering counts as a 500."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = False

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._observe(scope, message["status"], started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not answered:
                self._observe(scope, 500, started)
            raise

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = route_template(scope["app"], scope)
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.duration.labels(method, route).observe(time.perf_counter() - started)


router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics of this API process and of the fleet (no authentication)."""
    m: ApiMetrics = request.app.state.metrics
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
