"""Live progress of a batch as Server-Sent Events (``GET /v1/batches/{id}/events``).

The stream reads the database, never this process's memory, so it works behind any number of
API processes: about once a second it counts the batch's jobs per status (the query
``GET /v1/batches/{id}`` runs: one range of ``ix_jobs_batch_status``) and, when the counts
changed, sends the batch as that route shows it (``batch.progress``), then ``batch.completed``
once every job has ended, and ends. Between polls it holds no database connection and no
thread: the count runs in the thread pool with a session of its own, closed before the sleep.
A client that goes away cancels the response, which ends the generator.

Event ids: ``<seq>-<q>.<r>.<s>.<f>.<c>``, ``seq`` a millisecond timestamp forced above the
previous id's (``max(now, last + 1)``), then the counts the event showed (queued, running,
succeeded, failed, cancelled). An event's data is a function of those counts (the rest of the
batch never changes after intake), so the id names exactly the state a client saw, and any API
process can tell, from the id alone and the database, whether what it reads now is new to that
client: only if its counts differ. ``seq`` makes ids strictly increase along a client's
reconnections whichever process answers them. Why not the jobs' ``max(updated_at)``: it needs
every row of the batch read (no index covers it), a writer's timestamp is taken before its
commit, so commits that land out of order change the counts without moving the max, and it
depends on the writers' clocks. Why not the number of ended jobs: a retry of failed jobs moves
it backwards, and a job going back from running to queued does not move it at all.

Open streams are capped per tenant and per API process (``PCQ_SSE_MAX_STREAMS_PER_TENANT``,
``429 too_many_streams`` beyond), so one tenant cannot hold all of an API's connections.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import StreamingResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from pcq import views
from pcq.jobs.errors import TooManyStreams
from pcq.models import JOB_STATUSES, Batch
from pcq.views import BatchOut

log = logging.getLogger(__name__)

PROGRESS = "batch.progress"
COMPLETED = "batch.completed"
POLL_SECONDS = 1.0  # the "at most once a second"
MAX_ID_CHARS = 200  # a longer Last-Event-ID is none of ours: ignored
RETRY_AFTER_SECONDS = 5

Counts = dict[str, int]
_ID = re.compile(rf"(?P<seq>[0-9]+)-(?P<counts>[0-9]+(?:\.[0-9]+){{{len(JOB_STATUSES) - 1}}})")


@dataclass(frozen=True)
class EventId:
    """What an event's id says: when it was sent and the counts it showed."""

    seq: int
    counts: tuple[int, ...]  # per status, in JOB_STATUSES order

    def __str__(self) -> str:
        return f"{self.seq}-{'.'.join(map(str, self.counts))}"

    @classmethod
    def parse(cls, text: str | None) -> EventId | None:
        """The id a client sends back; None for anything this API did not send (then the
        stream starts afresh, as for a first connection)."""
        if not text or len(text) > MAX_ID_CHARS:
            return None
        match = _ID.fullmatch(text.strip())
        if match is None:
            return None
        return cls(int(match["seq"]), tuple(int(p) for p in match["counts"].split(".")))


def state_of(counts: Counts) -> tuple[int, ...]:
    return tuple(counts[s] for s in JOB_STATUSES)


def frame(kind: str, event_id: EventId, data: str) -> bytes:
    """One event; ``data`` is compact JSON, one line (JSON escapes every newline in a string)."""
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


# A comment line alone, no blank line after it: a blank line ends an event, and some clients
# (httpx-sse among them) then hand over an empty event carrying the last id.
PING = b": ping\n"


class StreamSlots:
    """Counts each tenant's open event streams in this process; ``take`` raises TooManyStreams."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._by_tenant: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, tenant_id: str) -> Callable[[], None]:
        """Take a slot; returns the function that gives it back (call it once)."""
        with self._lock:
            mine = self._by_tenant.get(tenant_id, 0)
            if mine >= self.per_tenant:
                raise TooManyStreams(
                    f"this tenant already has {mine} event streams open, the most allowed "
                    "(PCQ_SSE_MAX_STREAMS_PER_TENANT); close one, or poll GET /v1/batches/{id}",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._by_tenant[tenant_id] = mine + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._by_tenant[tenant_id] - 1
                if left:
                    self._by_tenant[tenant_id] = left
                else:
                    del self._by_tenant[tenant_id]

        return release


class EventStreamResponse(StreamingResponse):
    """``text/event-stream``, unbuffered by proxies; ``on_close`` runs once the response has
    ended, however it ends (finished, client gone, error), even if the body never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def batch_events(
    batch: Batch,
    first: Counts,
    load: Callable[[], Counts],
    *,
    last: EventId | None,
    ping_seconds: float,
    draining: threading.Event,
    spend: Callable[[BatchOut], BatchOut] | None = None,
) -> AsyncIterator[bytes]:
    """The events of one connection: the state now unless the client saw it (``last``), then
    each change, at most one a poll; ``batch.completed`` ends it. ``first``: the counts the
    route read; ``load`` reads them again (a blocking call, run in the thread pool). ``spend``
    adds the batch's usage and cost (one aggregate over its jobs): to ``batch.completed`` only,
    which is then the batch exactly as ``GET /v1/batches/{id}`` shows it; a progress event
    leaves them null rather than run that aggregate at every poll."""
    seen = last.counts if last else None
    seq = last.seq if last else 0
    loop = asyncio.get_running_loop()
    written = loop.time()
    counts = first
    while True:
        state = state_of(counts)
        out = views.batch_out(batch, counts)
        if state != seen and out.done and spend is not None:
            out = await run_in_threadpool(spend, out)
        if state != seen:
            seq = max(_now_ms(), seq + 1)
            yield frame(COMPLETED if out.done else PROGRESS, EventId(seq, state), out.model_dump_json())
            seen, written = state, loop.time()
        elif loop.time() - written >= ping_seconds:
            yield PING
            written = loop.time()
        if out.done:
            return
        await asyncio.sleep(POLL_SECONDS)
        if draining.is_set():  # the server is shutting down: the client resumes elsewhere
            return
        try:
            counts = await run_in_threadpool(load)
        except (DBAPIError, PoolTimeout) as exc:
            # Too late for a 503: the stream ends and the client resumes with its last id.
            log.warning(
                "event stream of %s ended: the database did not answer (%s)", batch.id, type(exc).__name__
            )
            return


def nothing_new(counts: Counts, total: int, last: EventId | None) -> bool:
    """The batch has ended and the client already saw it so: no event is left to send (the
    route answers 204, which tells an EventSource to stop reconnecting)."""
    return last is not None and last.counts == state_of(counts) and views.batch_done(counts, total)
