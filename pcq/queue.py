"""The Celery app both edges share, and the enqueuer the API and the sweeper call.

The API never imports worker code: it sends a message by task *name*, carrying the job id
only (no payload, no secret: anyone who can read the broker sees messages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError

from pcq.broker_epoch import BrokerEpoch
from pcq.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "pcq.run_jobs"
# Job ids per message. One message per job makes the broker the per-job cost (~1.3 ms of
# worker CPU to consume and ack each); a few dozen ids per message amortise it while still
# spreading a batch over many workers. A lost message loses nothing: the sweeper resends.
IDS_PER_MESSAGE = 50


def make_celery(settings: Settings, *, publisher: bool = False) -> Celery:
    """The Celery app; ``publisher=True`` for processes that only send (the API), which should
    give up on a dead broker quickly rather than hold a request for kombu's retries."""
    app = Celery("pcq", broker=settings.effective_broker_url, set_as_current=False)
    transport_options: dict[str, object] = {
        # Longer than the longest upstream call (checked in Settings): a message the worker
        # has not acked is only re-delivered after this.
        "visibility_timeout": settings.visibility_timeout_seconds,
    }
    if settings.effective_broker_url.startswith(("redis://", "rediss://")):
        # Fail fast when Redis is down: the API answers (the job is durable) instead of hanging.
        transport_options["socket_connect_timeout"] = 3
        if publisher:
            transport_options.update(max_retries=1, interval_start=0, connect_retries_timeout=2)
    if settings.effective_broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every transport option to create_engine(),
        # which refuses unknown ones; it has no visibility timeout to set anyway.
        transport_options = {}
    # Messages go through the default (nameless) exchange, which routes by queue name and
    # needs no binding keys in Redis: after a Redis FLUSHALL or restart, a named exchange's
    # bindings are gone and its messages are dropped until something re-declares them.
    queue = Queue(settings.queue_name, Exchange("", type="direct"), routing_key=settings.queue_name)
    app.conf.update(
        task_queues=[queue],
        task_default_queue=settings.queue_name,
        task_default_exchange="",
        task_default_routing_key=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once delivery; exactly-once effect comes from the database claim.
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # loops are capped by the job's attempt counter
        # The task only claims the job (milliseconds), so a few reserved messages per pool
        # thread keep the pool busy; a reserved message lost with its worker is re-sent by
        # the sweeper, and a redelivered duplicate fails its claim and is dropped.
        worker_prefetch_multiplier=4,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # retry for ever: Redis may come back
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=10,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


class Enqueuer:
    """Sends job ids to the workers. Failures are logged, never raised: the sweeper resends.

    While the broker is down, reaching it costs seconds (kombu's connect retries); after a
    failure the enqueuer does not try again for ``pause_seconds``, so an API request during a
    Redis outage answers at once (its jobs are durable and marked unsent) instead of waiting.

    When it is made (or, if Redis is away then, before its next send), it makes sure the
    broker holds an epoch marker (pcq/broker_epoch.py), so that a worker starting later does
    not take the messages this process sends for messages a broker lost.
    """

    def __init__(self, app: Celery, queue_name: str, pause_seconds: float = 5.0) -> None:
        self.app = app
        self.queue_name = queue_name
        self.pause_seconds = pause_seconds
        self._down_until = 0.0
        self._epoch = BrokerEpoch.for_broker(app.conf.broker_url, queue_name)
        self._epoch_written = self._epoch is None or self._epoch.ensure()

    @property
    def paused(self) -> bool:
        """A send failed less than ``pause_seconds`` ago: the next one would not be tried."""
        return time.monotonic() < self._down_until

    def backlog(self) -> int | None:
        """Messages waiting in the queue (not those reserved by workers); None if unknown."""
        if time.monotonic() < self._down_until:
            return None
        try:
            with self.app.connection_for_read() as conn:
                channel: Any = conn.default_channel
                declared = channel.queue_declare(queue=self.queue_name, passive=True)
                return int(declared.message_count)
        except ChannelError:
            # kombu's virtual transports answer NOT_FOUND for a queue with no message (Redis
            # deletes an empty list): nothing is waiting.
            return 0
        except Exception as exc:  # broker away or a transport that cannot tell
            log.debug("queue length unknown: %s", type(exc).__name__)
            return None

    def enqueue(self, job_ids: Sequence[str], per_message: int = IDS_PER_MESSAGE) -> int:
        """Send the ids, a chunk per message, over one connection; returns how many ids were sent."""
        sent = 0
        if time.monotonic() < self._down_until:
            return 0
        if not self._epoch_written and self._epoch is not None:
            self._epoch_written = self._epoch.ensure()
        try:
            with self.app.producer_or_acquire() as producer:
                for start in range(0, len(job_ids), per_message):
                    chunk = list(job_ids[start : start + per_message])
                    self.app.send_task(
                        RUN_JOB_TASK,
                        args=[chunk],
                        producer=producer,
                        queue=self.queue_name,
                        routing_key=self.queue_name,
                        exchange="",
                        retry=False,
                    )
                    sent += len(chunk)
        except Exception as exc:  # broker down: the rows are durable, the sweeper resends
            self._down_until = time.monotonic() + self.pause_seconds
            log.warning("enqueue failed after %d message(s): %s", sent, type(exc).__name__)
        return sent


def wake_key(queue_name: str) -> str:
    """The Redis list the API pushes to when it queued jobs, and the dispatcher waits on."""
    return f"pcq:dispatch:wake:{queue_name}"


def open_key(queue_name: str) -> str:
    """Set (with a short TTL) by the dispatcher while nothing waits and the quota has room to
    spare: the API may then send a single job's message itself."""
    return f"pcq:dispatch:open:{queue_name}"


class DispatchWake:
    """Tells the dispatcher that jobs were queued, so it need not wait for its next poll.

    The API sends no message itself (but see ``is_open``): the dispatcher (pcq.jobs.dispatch)
    picks what the broker gets, in the fair order. A wake is one ``LPUSH`` (the list is trimmed
    to one entry) on the Redis of ``PCQ_REDIS_URL``; it is a hint, never needed for correctness
    (the dispatcher polls), so a failure is logged and Redis is not asked again for
    ``pause_seconds``.
    Without Redis (embedded mode) it does nothing and the dispatcher polls more often.
    """

    def __init__(self, client: Any | None, queue_name: str, pause_seconds: float = 5.0) -> None:
        self.client = client
        self.key = wake_key(queue_name)
        self.open_key = open_key(queue_name)
        self.pause_seconds = pause_seconds
        self._down_until = 0.0

    def is_open(self) -> bool:
        """Whether the dispatcher says no job waits and the quota has room to spare (one
        ``EXISTS``): a single job may then skip the dispatcher's hop. False when unsure."""
        if self.client is None or time.monotonic() < self._down_until:
            return False
        try:
            return bool(self.client.exists(self.open_key))
        except Exception as exc:
            self._down_until = time.monotonic() + self.pause_seconds
            log.warning("could not ask the dispatcher: %s", type(exc).__name__)
            return False

    def __call__(self) -> None:
        if self.client is None or time.monotonic() < self._down_until:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.key, 1)
            pipe.ltrim(self.key, 0, 0)
            pipe.execute()
        except Exception as exc:  # Redis away: the dispatcher's poll finds the jobs anyway
            self._down_until = time.monotonic() + self.pause_seconds
            log.warning("could not wake the dispatcher: %s", type(exc).__name__)
