"""The worker's engine: an asyncio loop in its own thread that holds upstream calls in flight.

Why this shape: a ``core`` call can take five minutes and the quota allows hundreds per
minute, so one worker process must hold thousands of calls open. A thread per call (Celery's
threads pool) or a process per call (prefork) caps that far lower and costs far more CPU;
one event loop holds thousands of sockets cheaply. Celery stays the distributed transport:
its task hands a message's job ids to this engine and returns as soon as they are *claimed*
in the database (status ``running`` with a lease). From then on the database, not the
broker, owns the job: a worker that dies leaves expired leases that any worker's sweeper
re-enqueues.

Database work is batched, because per-job transactions are what make a naive worker
CPU-bound: one statement claims all the ids of a message, and a writer stores the outcomes
of many calls (attempts, results, usage, basis, citations) per transaction. It runs in a
small thread pool so the loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.orm import Session
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_chain,
    wait_fixed,
)

from pcq import logs
from pcq.broker_epoch import BrokerEpoch
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import lifecycle
from pcq.jobs.lifecycle import ClaimedJob, Settled
from pcq.models import utcnow
from pcq.queue import Enqueuer
from pcq.settings import Settings
from worker.deliverer import Deliverer
from worker.dispatcher import Dispatcher
from worker.limiter import KeyPool, PoolKey
from worker.metrics import WorkerMetrics
from worker.upstream import UpstreamClient
from worker.webhook_net import WebhookPoster

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_RETRY_SECONDS = (0.5, 1, 2, 4, 8, 15, 30)  # riding out a database restart
WRITE_BATCH = 200  # outcomes per transaction at most
WRITE_LINGER = 0.01  # seconds a small batch waits for company, while other calls run
SWEEP_CHUNK = 1000  # jobs one sweep query sends at most
SUSPECT_DEFER_SECONDS = 2.0  # a suspect left for a free lane is offered again after this
RECOVERY_CHUNKS = 50  # after a broker loss, chunks one sweep sends before the next sweep goes on
# SQLSTATE classes of a statement the database refuses whatever the retry: data exception (a
# value a column cannot hold), integrity violation, syntax or access, program limit exceeded
# (an index entry over 2,704 bytes). A restart, a lost connection or a deadlock is none of these.
REFUSED_SQLSTATE_CLASSES = frozenset({"22", "23", "42", "54"})


def refused(exc: BaseException) -> bool:
    """Whether a database error is one a retry cannot mend: SQLAlchemy's, or the driver's own
    (the answers go in by COPY, straight through psycopg)."""
    sqlstate = getattr(exc.orig if isinstance(exc, DBAPIError) else exc, "sqlstate", None)
    if isinstance(sqlstate, str):  # PostgreSQL
        return sqlstate[:2] in REFUSED_SQLSTATE_CLASSES
    return isinstance(exc, (DataError, IntegrityError, ProgrammingError))  # SQLite


async def store_apart(
    store: Callable[[list[Settled]], Awaitable[set[str]]], items: list[Settled]
) -> dict[str, Settled]:
    """Store ``items`` in one transaction; if the database refuses it, in halves, and so on, so
    that one outcome no column can hold costs its own job only, not the 199 written with it.
    An outcome refused alone is stored as a failure of its job (``unstorable``): its call is
    not made again, and its attempt is on record. Returns what was stored, by job id: the
    outcome itself, or the failure stored in its place (the ids ``store`` reports)."""
    try:
        ids = await store(items)
        return {i.job.id: i for i in items if i.job.id in ids}
    except Exception as exc:
        if not refused(exc):
            raise
        if len(items) > 1:
            half = len(items) // 2
            return await store_apart(store, items[:half]) | await store_apart(store, items[half:])
        item = items[0]
        if item.completion is None and item.code == "unstorable":
            raise  # even the failure cannot be stored: the lease expires and the job runs again
        # The writer stores many jobs at once: this line names its own job's ids.
        log.error(
            "job %s: the database refused its outcome (%s); failing it",
            item.job.id,
            type(exc).__name__,
            extra=item.job.log_fields(),
        )
        error = f"the answer could not be stored: the database refused it ({type(exc).__name__})"
        failed = Settled(item.job, item.record, code="unstorable", error=error)
        return await store_apart(store, [failed])


def _stored_fields(settled: Settled, max_attempts: int) -> dict[str, Any]:
    """What the "stored" line says: the job's status now, and its citations if it succeeded."""
    if settled.completion is not None:
        cited = sum(len(b.citations) for b in settled.completion.basis)
        return {"status": "succeeded", "citations": cited}
    again = settled.retry_at is not None and not settled.job.exhausted(max_attempts)
    return {"status": "queued" if again else "failed", "error_code": settled.code}


def heartbeat_path(settings: Settings) -> Path:
    return Path(tempfile.gettempdir()) / f"pcq-worker-{settings.queue_name}.heartbeat"


class Engine:
    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        enqueuer: Enqueuer,
        redis_factory: Callable[[], Any],
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.sessions = session_factory
        self.enqueuer = enqueuer
        self._redis_factory = redis_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pcq-engine", daemon=True)
        self._ready = threading.Event()
        self._db_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pcq-db")
        self._running: dict[str, int] = {}  # job id -> attempt number held here
        self._suspects = 0  # suspects among them (see lifecycle.SUSPECT_AFTER_LOSSES)
        self._stop: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._outbox: asyncio.Queue[tuple[Settled, asyncio.Future[Settled | None]]] | None = None
        self._upstream: UpstreamClient | None = None
        self._pool: KeyPool | None = None
        self._closing = False
        self._accept_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        # The sweeper's view of the broker's Redis: None for a broker that cannot lose its data.
        self._broker_epoch = BrokerEpoch.for_settings(settings)
        self._lost_before: datetime | None = None  # messages sent before this may be lost

    # -- life cycle (called from other threads) ----------------------------------------
    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("engine did not start")

    def stop(self, timeout: float = 10.0) -> None:
        """Let calls finish for up to ``timeout`` s, then hand the rest back at once.

        Calls still running (a ``core`` call can take minutes) get their leases expired, so
        the dispatcher sends them again instead of waiting for the lease to run out.
        """
        if self._stop is not None and self._thread.is_alive():
            drain = asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop)
            try:
                drain.result(timeout + 15)
            except Exception as exc:
                log.warning("shutdown: could not hand jobs back (%s)", type(exc).__name__)
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        self._db_pool.shutdown(wait=False, cancel_futures=True)

    async def _drain(self, timeout: float) -> None:
        self._closing = True
        # No more sends from here: a message this process sent now could be reserved by its
        # own consumer as it shuts down and sit unacked until the visibility timeout.
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self._loop.time() + timeout
        while self._running and self._loop.time() < deadline:
            await asyncio.sleep(0.1)
        claims = list(self._running.items())
        if claims:
            released = await self._db(lambda db: lifecycle.release(db, claims, now=utcnow()))
            log.info("shutdown: handed %d running job(s) back for another worker", released)

    def begin_shutdown(self) -> None:
        """Stop claiming (called as Celery's warm shutdown begins, from its main thread).

        Pool threads waiting for quota room then return at once, their jobs unclaimed and
        marked unsent, so Celery's wait for running tasks is short and nothing is stranded.
        """
        self._closing = True

    def submit(self, job_ids: list[str]) -> int:
        """Claim the jobs and start their calls; blocks only while every slot is busy."""
        future = asyncio.run_coroutine_threadsafe(self._accept(job_ids), self._loop)
        return future.result()

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        s = self.settings
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(s.max_in_flight)
        self._outbox = asyncio.Queue()
        keys = s.key_pool()
        http = UpstreamClient.make_http_client(
            s.connect_timeout_seconds, s.read_timeout_seconds, s.max_in_flight
        )
        self._upstream = UpstreamClient(
            http,
            base_url=s.parallel_base_url,
            api_key=[k.key for k in keys],
            total_timeout=s.total_timeout_seconds,
            max_response_bytes=s.max_response_bytes,
        )
        redis = self._redis_factory()
        # One budget per upstream key, shared with every other worker through Redis.
        self._pool = KeyPool(
            redis,
            [PoolKey(k.id, k.rate_limit_per_minute, k.rate_limit_burst, k.max_in_flight) for k in keys],
        )
        self.metrics.quota_per_minute.set(sum(k.rate_limit_per_minute for k in keys))
        for k in keys:
            log.info(
                "upstream key %s: %d/min, burst %d, in-flight cap %s",
                k.id,
                k.rate_limit_per_minute,
                k.rate_limit_burst,
                k.max_in_flight or "none",
            )
        writers = 1 if s.database_url.startswith("sqlite") else 2  # SQLite has one writer anyway
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sweeper")
        # Webhooks go out from the same loop, with their own cap: never an upstream slot.
        poster = WebhookPoster(allow_private=s.webhook_allow_private, timeout=s.webhook_timeout_seconds)
        deliverer = Deliverer(s, self._db, poster, self.metrics)
        dispatcher = Dispatcher(
            s,
            self._db,
            self._pool,
            self.enqueuer,
            redis,
            closing=lambda: self._closing,
            woken=bool(s.redis_url),
        )
        background = [
            asyncio.create_task(dispatcher.run(), name="dispatcher"),
            asyncio.create_task(deliverer.run(), name="webhook-deliverer"),
            self._sweeper,
            asyncio.create_task(self._renew_forever(), name="lease-renewer"),
            asyncio.create_task(self._pool.run(), name="limiter-permits"),
            *(asyncio.create_task(self._write_forever(), name=f"writer-{n}") for n in range(writers)),
        ]
        self._ready.set()
        await self._stop.wait()
        for task in background:
            task.cancel()
        # Let them unwind before the loop ends: a task cancelled but never run again is
        # "destroyed but pending", an ERROR line at every shutdown. One stuck in a thread (a
        # blocking Redis call) is not waited for beyond a few seconds.
        await asyncio.wait(background, timeout=3)
        await http.close()
        await redis.aclose()

    async def _db(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with unit_of_work(self.sessions) as session:
                return fn(session)

        return await self._loop.run_in_executor(self._db_pool, run)

    async def _retrying_db(self, fn: Callable[[Session], T], *, what: str) -> T:
        """Run a unit of work, riding out a database restart before giving up: one try, then one
        more after each of DB_RETRY_SECONDS; the last error is raised."""

        def log_retry(state: RetryCallState) -> None:
            assert state.outcome is not None
            assert state.next_action is not None
            error = type(state.outcome.exception()).__name__
            log.warning("%s failed (%s); retrying in %gs", what, error, state.next_action.sleep)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(len(DB_RETRY_SECONDS) + 1),
            wait=wait_chain(*(wait_fixed(d) for d in DB_RETRY_SECONDS)),
            retry=retry_if_exception(lambda exc: not refused(exc)),
            before_sleep=log_retry,
            reraise=True,
        )
        return await retrying(self._db, fn)

    async def _accept(self, job_ids: list[str]) -> int:
        """Claim ``job_ids`` as slots free up, a share at a time; returns how many were claimed.

        Only as many jobs are claimed as the shared limiter can start within the admission
        horizon: the rest stay queued in the broker, unclaimed, so waiting for the quota
        costs no attempt, no lease and no engine slot, and a cancel still reaches them.
        One message at a time takes slots (the lock): two pool threads each holding part of
        the slots they need would otherwise wait for each other for ever.
        """
        assert self._slots is not None
        claimed_total = 0
        remaining = list(job_ids)
        async with self._accept_lock:
            while remaining:
                room = await self._room(len(remaining))
                if self._closing:
                    # Shutting down: leave them queued and unsent; the dispatcher sends them again.
                    await self._db(lambda db, ids=remaining: lifecycle.clear_enqueued(db, ids))  # type: ignore[misc]
                    break
                await self._slots.acquire()
                take = 1
                while take < min(len(remaining), room) and not self._slots.locked():
                    await self._slots.acquire()
                    take += 1
                chunk, remaining = remaining[:take], remaining[take:]
                claimed_total += await self._claim(chunk)
        return claimed_total

    async def _room(self, wanted: int) -> int:
        """How many calls the shared limiter can start within the horizon; waits while none."""
        assert self._pool is not None
        while not self._closing:
            try:
                room, opens_in = await self._pool.room(self.settings.admission_horizon_seconds)
            except (RedisError, OSError):
                return wanted  # the limiter is away: _admit waits for it (or gives the job back)
            if room > 0:
                return room
            # Booked a horizon ahead: ask again once a quarter of it has passed (or when room
            # opens, if later), so waiting costs a few Redis calls, not one per slot.
            horizon = self.settings.admission_horizon_seconds
            await asyncio.sleep(max(opens_in, horizon / 4) if opens_in >= 0 else self._pool.poll)
        return 0

    async def _claim(self, chunk: list[str]) -> int:
        """Claim ids for which a slot is already held; start their calls; free unused slots.

        Suspects (jobs whose worker died under them twice) run at most SUSPECT_LANE at a time
        here; the others are left queued and unsent for SUSPECT_DEFER_SECONDS, after which the
        dispatcher offers them again, perhaps to a worker whose lane is free; so a job that
        kills its worker cannot take innocent ones with it again and again.
        """
        assert self._slots is not None
        s = self.settings
        room = lifecycle.SUSPECT_LANE - self._suspects
        try:
            result = await self._retrying_db(
                lambda db: lifecycle.claim_many(
                    db,
                    chunk,
                    now=utcnow(),
                    lease_seconds=s.lease_seconds,
                    max_attempts=s.max_attempts,
                    prices=s.prices,
                    suspect_room=room,
                ),
                what=f"claiming {len(chunk)} job(s)",
            )
        except Exception:
            for _ in chunk:
                self._slots.release()
            raise
        if result.deferred:
            later = utcnow() + timedelta(seconds=SUSPECT_DEFER_SECONDS)
            await self._db(lambda db: lifecycle.defer(db, result.deferred, until=later))
        for _ in range(len(chunk) - len(result.jobs)):
            self._slots.release()
        for job, origin in result.reused:  # stored succeeded by the claim, with no call
            log.info(
                "answer reused", extra={**job.log_fields(), "status": "succeeded", "reused_from": origin}
            )
        for job in result.jobs:
            self._running[job.id] = job.attempt
            if job.suspect:
                self._suspects += 1
                log.warning(
                    "job %s runs as a suspect: its worker died under it %d times",
                    job.id,
                    job.lease_losses,
                    extra=job.log_fields(),
                )
            asyncio.create_task(self._execute(job), name=f"job-{job.id}")
        return len(result.jobs)

    async def _execute(self, job: ClaimedJob) -> None:
        assert self._slots is not None
        assert self._upstream is not None
        assert self._pool is not None
        assert self._outbox is not None
        held: tuple[int, str] | None = None
        # This task's own context: every line logged for the job from here carries its ids.
        logs.bind(**job.log_fields())
        # One INFO line per call ("stored", below, says how the call went too): at ~500 jobs/s a
        # line costs a worker ~2% of its CPU (docs/benchmarks.md, "Issue 13"); DEBUG has the steps.
        log.debug("claimed")
        try:
            held = await self._admit(job)
            if held is None:
                return
            with self.metrics.calls_in_flight.track_inprogress():
                outcome = await self._upstream.call(job.request_json, held[0])
            self.metrics.record_call(job.model, outcome)
            call = {
                "status_code": outcome.status_code,
                "latency_ms": int((outcome.finished_at - outcome.started_at).total_seconds() * 1000),
                "outcome": outcome.kind,
            }
            log.debug("upstream call done", extra=call)
            if outcome.status_code == 429:
                # Every worker pauses this key (Retry-After, else backoff) and then sends to
                # it more slowly; its rate climbs back while no 429 comes.
                pause = outcome.retry_after or lifecycle.backoff_seconds(
                    job.tries, self.settings.retry_base_seconds, self.settings.retry_max_seconds, None
                )
                try:
                    await self._pool.report_429(held[0], pause)
                except (RedisError, OSError) as exc:  # the attempt must still be stored
                    log.warning("could not share a 429 cool-down (%s)", type(exc).__name__)
            stored: asyncio.Future[Settled | None] = self._loop.create_future()
            settled = lifecycle.settle(job, outcome, self.settings, self._pool.keys[held[0]].id)
            self._outbox.put_nowait((settled, stored))
            self._pool.release(*held)  # the call is over; storing it needs no permit
            held = None
            written = await stored  # what the database now holds (None: the claim was lost)
            if written is not None:
                log.info("stored", extra=call | _stored_fields(written, self.settings.max_attempts))
        except Exception:
            # The lease will expire and the sweeper hands the job to a worker again.
            log.exception("job %s attempt %d: unexpected error", job.id, job.attempt)
        finally:
            if held is not None:
                self._pool.release(*held)
            if job.suspect:
                self._suspects -= 1
            if self._running.get(job.id) == job.attempt:
                # Only this claim's entry: if the job was claimed again here meanwhile (its
                # lease expired under load), the newer claim's lease must go on being renewed.
                del self._running[job.id]
            self._slots.release()

    async def _admit(self, job: ClaimedJob) -> tuple[int, str] | None:
        """Wait for a slot on one of the shared keys: ``(key index, permit)``; if Redis stays
        unreachable, give the claim back and return None.

        A Redis restart leaves pooled connections stale, so the first calls after it fail at
        once: retry them, and never burn an attempt (or a lease) on a call that was not made.
        """
        assert self._pool is not None
        # A loop, not tenacity: this runs once per job, and an AsyncRetrying call costs ~40 µs
        # of CPU even when the first try succeeds (measured when tenacity came in).
        waiting_since = self._loop.time()
        for delay in (0.1, 0.5, 1, 2, 4, 8):
            try:
                held = await self._pool.acquire()
                self.metrics.ratelimit_wait.observe(self._loop.time() - waiting_since)
                return held
            except (RedisError, OSError) as exc:
                log.warning("limiter unreachable (%s); retrying in %ss", type(exc).__name__, delay)
                await asyncio.sleep(delay)
        now = utcnow()
        await self._retrying_db(
            lambda db: lifecycle.unclaim(db, job, now=now, retry_at=now + timedelta(seconds=5)),
            what=f"giving job {job.id} back",
        )
        return None

    async def _write_forever(self) -> None:
        """Store outcomes in batches: one transaction for up to WRITE_BATCH calls."""
        assert self._outbox is not None
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < WRITE_BATCH:
                if self._outbox.empty():
                    # Wait for company only if some call could still bring it: with no other
                    # call running here (an idle worker), lingering only delays the answer.
                    if len(batch) >= 20 or len(self._running) <= len(batch):
                        break
                    await asyncio.sleep(WRITE_LINGER)
                    if self._outbox.empty():
                        break
                batch.append(self._outbox.get_nowait())
            items = [item for item, _ in batch]
            try:
                owned = await store_apart(self._store, items)
                lost = [i.job.id for i in items if i.job.id not in owned]
                if lost:
                    log.info("%d outcome(s) discarded: claim lost (taken over or cancelled)", len(lost))
                for item, done in batch:
                    if not done.done():
                        done.set_result(owned.get(item.job.id))
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)

    async def _store(self, items: list[Settled]) -> set[str]:
        started = time.perf_counter()
        try:
            owned = await self._retrying_db(
                lambda db: lifecycle.store_outcomes(db, items, max_attempts=self.settings.max_attempts),
                what=f"storing {len(items)} outcome(s)",
            )
        finally:
            self.metrics.db_write.observe(time.perf_counter() - started)
        self.metrics.record_stored(items, owned)
        return owned

    # -- background duties -------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        beat = heartbeat_path(self.settings)
        try:
            while True:
                try:
                    await self.sweep_once()
                except Exception as exc:
                    log.warning("sweep failed: %s", type(exc).__name__)
                beat.touch()  # liveness for `pcq healthcheck worker`: the loop is turning
                await asyncio.sleep(self.settings.sweep_interval_seconds)
        finally:
            if self._broker_epoch is not None:
                self._broker_epoch.close()

    async def sweep_once(self) -> int:
        """Send messages for lost messages and expired leases (never-sent jobs, first runs and
        due retries, are the dispatcher's).

        A job whose message is merely old is sent again only once the broker's queue is empty
        (or its length unknown): with a backlog longer than ``PCQ_REQUEUE_AFTER_SECONDS`` (the
        quota is behind), re-sending every waiting job would only lengthen the queue.

        After the broker's Redis lost its data (pcq/broker_epoch.py: one GET per sweep tells),
        every job whose message was sent before the loss is sent again at once, whatever the
        queue holds, a chunk after another until none is left.
        """
        s = self.settings
        if self._broker_epoch is not None:
            lost = await self._loop.run_in_executor(None, self._broker_epoch.check)
            if lost is not None and (self._lost_before is None or lost > self._lost_before):
                self._lost_before = lost
        backlog = await self._loop.run_in_executor(None, self.enqueuer.backlog)
        total = 0
        for _ in range(RECOVERY_CHUNKS):
            lost_before = self._lost_before
            # Marked as sent no earlier than the loss, so a chunk is never picked twice.
            now = utcnow() if lost_before is None else max(utcnow(), lost_before)
            due = await self._db(
                functools.partial(
                    lifecycle.due_for_enqueue,
                    now=now,
                    requeue_after_seconds=s.requeue_after_seconds,
                    limit=SWEEP_CHUNK,
                    resend_stale=not backlog,
                    lost_before=lost_before,
                )
            )
            ids = [d.id for d in due]
            sent = await self._loop.run_in_executor(None, self.enqueuer.enqueue, ids) if ids else 0
            total += sent
            for d in due[:sent]:
                self.metrics.sweeper_resent.labels(d.reason).inc()
            if sent < len(ids):  # the broker is away: the next sweep goes on from here
                await self._db(functools.partial(lifecycle.clear_enqueued, job_ids=ids[sent:]))
                break
            if lost_before is None:
                break  # no loss to make up for: one chunk per sweep
            if len(ids) < SWEEP_CHUNK:  # the last chunk: nothing sent before the loss is left
                if total:
                    log.warning("sent %d job(s) whose message the broker may have lost", total)
                self._lost_before = None
                break
        return total

    async def _renew_forever(self) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            claims = list(self._running.items())
            if not claims:
                continue
            try:
                await self._db(
                    lambda db, claims=claims: lifecycle.renew_leases(  # type: ignore[misc]
                        db, claims, now=utcnow(), lease_seconds=self.settings.lease_seconds
                    )
                )
            except Exception as exc:
                log.warning("lease renewal failed: %s", type(exc).__name__)
