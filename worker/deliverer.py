"""The worker's webhook deliverer: a task on the engine's event loop that sends due webhook
events, many at once, and stores each attempt.

Why here: a delivery is an HTTP call that may wait up to ``PCQ_WEBHOOK_TIMEOUT_SECONDS`` on a
slow receiver, like an upstream call waits on the upstream; the engine's loop holds thousands of
such waits cheaply, and a delivery never takes an upstream slot (it has its own cap,
``MAX_IN_FLIGHT``). Events are leased, as jobs are: an event whose worker died mid-delivery is
due again once its lease expires, and any worker's deliverer takes it (at least once; the
receiver dedups by ``webhook-id``). pcq.jobs.outbox decides what an outcome does; this module
sends (through worker/webhook_net.py's guarded poster) and signs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from pcq import logs
from pcq.jobs import outbox
from pcq.jobs.outbox import AttemptOutcome, Delivery
from pcq.models import utcnow
from pcq.settings import Settings
from pcq.webhooks import signed_headers
from worker.metrics import WorkerMetrics, webhook_outcome
from worker.webhook_net import WebhookPoster

log = logging.getLogger(__name__)
T = TypeVar("T")


class RunInDb(Protocol):
    """Runs a unit of work off the loop (the engine's ``_db``)."""

    def __call__(self, fn: Callable[[Session], T], /) -> Awaitable[T]: ...


MAX_IN_FLIGHT = 200  # deliveries one worker holds open at once
POLL_SECONDS = 0.5  # how often an idle deliverer looks for due events


def lease_seconds(timeout: float) -> float:
    """An event's lease: twice the delivery's deadline and 5 s more, so a live worker's delivery
    (and the write of its attempt) ends well within it; a dead worker's expires soon after."""
    return 2 * timeout + 5


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        db: RunInDb,
        poster: WebhookPoster,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._db = db
        self.poster = poster
        self.metrics = metrics or WorkerMetrics()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    taken = await self.deliver_due()
                except Exception as exc:
                    log.warning("webhook deliveries: could not take due events (%s)", type(exc).__name__)
                    taken = 0
                if taken == 0 or len(self._in_flight) >= MAX_IN_FLIGHT:
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            for task in self._in_flight:
                task.cancel()  # their leases expire and another worker delivers them
            await self.poster.close()

    async def deliver_due(self) -> int:
        """Lease as many due events as there is room for, and start sending them."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return 0
        s = self.settings
        due = await self._db(
            lambda db: outbox.take_due(
                db,
                now=utcnow(),
                lease_seconds=lease_seconds(s.webhook_timeout_seconds),
                limit=room,
                max_inline_bytes=s.webhook_max_inline_bytes,
                api_url=s.api_url,
            )
        )
        for d in due:
            task = asyncio.create_task(self._deliver(d), name=f"webhook-{d.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(due)

    async def _deliver(self, d: Delivery) -> None:
        # This task's own context; never the URL (its userinfo or query may hold a token).
        logs.bind(tenant=d.tenant_id, job_id=d.job_id, batch_id=d.batch_id, event_id=d.id)
        try:
            headers = signed_headers(d.secrets, d.id, int(time.time()), d.body)
            at = utcnow()
            sent = await self.poster.post(d.url, d.body, headers)
            self.metrics.webhook_attempts.labels(webhook_outcome(sent.error, sent.status_code)).inc()
            outcome = AttemptOutcome(
                at=at,
                status_code=sent.status_code,
                latency_ms=sent.latency_ms,
                error=sent.error,
                response=sent.body_excerpt,
                retry_after=sent.retry_after,
            )
            schedule = self.settings.webhook_retry_schedule
            status = await self._db(lambda db: outbox.settle(db, d, outcome, schedule=schedule))
            log.info(
                "webhook %s (%s) attempt: %s -> %s",
                d.id,
                d.type,
                sent.status_code if sent.error is None else sent.error,
                status,
            )
        except Exception as exc:
            # The lease expires and the event is sent again (at least once).
            log.warning("webhook %s: delivery failed unexpectedly (%s)", d.id, type(exc).__name__)
