"""The dispatcher: one per deployment, elected through Redis, feeding the broker a short, fair queue.

Every worker runs this task on its engine's loop; the one that holds the lease
(``pcq:dispatcher:<queue>``, holding ``<pid>:<random>``; ``SET NX`` with a TTL of
LEASE_SECONDS, renewed each second) dispatches, the others wait to take over. A dispatcher
that dies (``kill -9``) stops renewing, and another worker leads within LEASE_SECONDS.

One dispatch, in one transaction: count what the broker holds (sent, not claimed); from the
room the shared quota has within the admission horizon, less that, pick jobs in the fair
order (pcq.jobs.dispatch), mark them sent, send their messages, commit. A crash before the
commit rolls the marks back: the jobs wait to be picked again (a message that did leave runs
its job, once: the copy a later dispatch sends finds it claimed and is dropped). A broker that
refuses the send leaves its jobs unsent. So the broker holds at most a horizon of work, and a
job submitted behind a backlog waits for at most that, not for the backlog. A job sent more
than SENT_HORIZONS horizons ago and still unclaimed stops counting as held (its message may
have gone with a dead worker; the sweeper sends it again), so it cannot stall the others.

The API wakes the dispatcher after each submission (pcq.queue.DispatchWake: a Redis list it
blocks on), so an idle stack dispatches a new job at once; without that wake (embedded mode,
no Redis) it polls every POLL_SECONDS. While nothing waits and the quota has room to spare,
the dispatcher also says so (``pcq:dispatch:open:<queue>``, a TTL of OPEN_SECONDS): a single
job submitted then is sent by the API itself, which is what the order would do at once, and
saves an idle job this hop (about 10 ms of its 45 in the latency benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from pcq.jobs import dispatch, lifecycle
from pcq.jobs.dispatch import FairOrder
from pcq.models import utcnow
from pcq.queue import Enqueuer, open_key, wake_key
from pcq.settings import Settings
from worker.limiter import KeyPool, window_safe

log = logging.getLogger(__name__)
T = TypeVar("T")

LEASE_SECONDS = 5.0  # a dead dispatcher's lease runs out after this; another worker leads
RENEW_SECONDS = 1.0
MAX_PER_DISPATCH = 5000  # jobs one transaction sends at most; more go in the next at once
IDLE_SECONDS = 1.0  # with the API's wake: how long to block for one when nothing waits
BACKLOG_SECONDS = 0.2  # jobs wait for quota room: look again this soon
POLL_SECONDS = 0.1  # no wake channel (embedded mode): poll this often
TERMS_SECONDS = 2.0  # tenants' weights and caps are read again after this
OPEN_SECONDS = 2.0  # the TTL of the "open" flag (pcq.queue.open_key), refreshed while it holds
OPEN_SHARE = 0.2  # open while at least this share of the horizon's room is free
# A job sent this many horizons ago and still unclaimed no longer counts as held by the broker
# (its message was likely lost with a worker; the sweeper sends it again).
SENT_HORIZONS = 3
FAILURES_TO_RESIGN = 3  # dispatches failing in a row: hand the lease to another worker

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        db: Callable[[Callable[[Session], Any]], Awaitable[Any]],
        pool: KeyPool,
        enqueuer: Enqueuer,
        redis: Any,
        *,
        closing: Callable[[], bool],
        woken: bool,
    ) -> None:
        self.settings = settings
        self._db = db
        self._pool = pool
        self._enqueuer = enqueuer
        self._redis = redis
        self._closing = closing
        self._woken = woken  # the API wakes us through Redis (not in embedded mode)
        self._lease_key = f"pcq:dispatcher:{settings.queue_name}"
        self._wake_key = wake_key(settings.queue_name)
        self._open_key = open_key(settings.queue_name)
        self._open_until = 0.0  # monotonic: when the flag we set expires (0: not set)
        self._flag_cleared = False  # we deleted the flag since we took the lease
        self._spare = 0  # room the last dispatch left unused
        # Which process dispatches, for an operator (and a test) reading the lease: pid:random.
        self._token = f"{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._leader = False
        self._renew_at = 0.0
        self._lead_after = 0.0  # monotonic: after resigning, do not lead again before this
        self._known_terms: dict[str, dispatch.Policy] = {}
        self._terms_until = 0.0
        quota = sum(window_safe(k.limit_per_minute, k.burst)[0] for k in pool.keys) / 60
        self.order = FairOrder(quota, settings.admission_horizon_seconds)
        self._open_margin = max(1, int(quota * settings.admission_horizon_seconds * OPEN_SHARE))

    async def run(self) -> None:
        failures = 0
        try:
            while not self._closing():
                try:
                    if not await self._lead():
                        await asyncio.sleep(RENEW_SECONDS)
                        continue
                    more, waiting = await self.dispatch_once()
                    await self._say_open(not waiting and self._spare >= self._open_margin)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    log.warning("dispatch failed (%s), %d in a row", type(exc).__name__, failures)
                    if failures >= FAILURES_TO_RESIGN:
                        # Perhaps only this worker is cut off (its database pool, its Redis
                        # connection): let another one lead instead of holding the lease.
                        await self._resign()
                        self._lead_after = time.monotonic() + LEASE_SECONDS
                        failures = 0
                    await asyncio.sleep(RENEW_SECONDS)
                    continue
                if more:
                    continue
                if waiting:
                    # Jobs wait for room: look again soon, but not at every submission's wake
                    # (each dispatch reads the backlog's groups).
                    await asyncio.sleep(BACKLOG_SECONDS)
                else:
                    await self._wait(IDLE_SECONDS)
        finally:
            await self._resign()

    async def _lead(self) -> bool:
        now = time.monotonic()
        if self._leader and now < self._renew_at:
            return True
        ms = int(LEASE_SECONDS * 1000)
        if self._leader:
            self._leader = bool(await self._redis.eval(_RENEW, 1, self._lease_key, self._token, ms))
            if not self._leader:
                log.warning("dispatch: lost the dispatcher's lease; another worker dispatches")
        elif now < self._lead_after:
            return False  # it resigned: another worker's turn first
        else:
            self._leader = bool(await self._redis.set(self._lease_key, self._token, nx=True, px=ms))
            if self._leader:
                log.info("dispatch: this worker dispatches")
                self.order = FairOrder(self.order.quota_per_second, self.order.horizon)
                self._flag_cleared = False
        self._renew_at = now + RENEW_SECONDS
        return self._leader

    async def _resign(self) -> None:
        """Hand the lease on at once instead of after its TTL (a worker that stops, or one
        whose dispatches keep failing)."""
        if not self._leader:
            return
        self._leader = False
        try:
            await self._say_open(False)
            await self._redis.eval(_RESIGN, 1, self._lease_key, self._token)
        except (RedisError, OSError):
            pass

    async def _say_open(self, is_open: bool) -> None:
        """Tell the API whether a single job may skip this hop: nothing waits, and the quota's
        room within the horizon, less what the broker holds, is at least OPEN_SHARE of all of
        it. Set with a TTL of OPEN_SECONDS and refreshed while it holds, so a dispatcher that
        dies closes it by itself; written only when it changes or is due for a refresh. A
        single job each API sends meanwhile wakes this loop, which closes it as room runs low.
        """
        now = time.monotonic()
        if is_open and now >= self._open_until - OPEN_SECONDS / 2:
            await self._redis.set(self._open_key, 1, px=int(OPEN_SECONDS * 1000))
            self._open_until = now + OPEN_SECONDS
        elif not is_open and (self._open_until > now or not self._flag_cleared):
            # Also once after taking the lease: the flag may be a dead leader's.
            await self._redis.delete(self._open_key)
            self._open_until = 0.0
            self._flag_cleared = True

    async def _wait(self, seconds: float) -> None:
        if not self._woken:
            await asyncio.sleep(min(seconds, POLL_SECONDS))
            return
        try:
            await self._redis.blpop([self._wake_key], timeout=seconds)
        except (RedisError, OSError):  # Redis away: wait the time out, then try again
            await asyncio.sleep(seconds)

    def _terms(self, session: Session, tenants: set[str]) -> dict[str, dispatch.Policy]:
        """The tenants' weights and caps, read again at most every TERMS_SECONDS (a change by
        ``pcq tenants set`` takes effect within that)."""
        clock = time.monotonic()
        if clock >= self._terms_until or not tenants <= self._known_terms.keys():
            self._known_terms = dispatch.policies(session, tenants)
            self._terms_until = clock + TERMS_SECONDS
        return self._known_terms

    async def dispatch_once(self) -> tuple[bool, int]:
        """One dispatch: ``(more to send at once, jobs left waiting)``."""
        self._spare = 0
        room, _opens_in = await self._pool.room(self.settings.admission_horizon_seconds)
        if room <= 0:
            return False, 1  # nothing can start within the horizon: look again soon
        now = utcnow()
        clock = time.monotonic()

        since = now - timedelta(seconds=SENT_HORIZONS * self.settings.admission_horizon_seconds)

        def work(session: Session) -> tuple[bool, int]:
            if self._enqueuer.paused:  # the broker refused a send moments ago: take nothing
                return False, 1
            n = min(room - dispatch.sent_unclaimed(session, since=since), MAX_PER_DISPATCH)
            if n <= 0:
                return False, 1
            groups = dispatch.backlog(session, now=now)
            if not groups:
                self._spare = n
                return False, 0
            terms = self._terms(session, {g.tenant_id for g in groups})
            ids = dispatch.take(session, self.order.plan(groups, terms, n, clock), now=now)
            sent = self._enqueuer.enqueue(ids) if ids else 0
            if sent < len(ids):  # the broker is away: they stay unsent, picked again later
                lifecycle.clear_enqueued(session, ids[sent:])
            self._spare = n - sent
            return sent == n == MAX_PER_DISPATCH, sum(g.waiting for g in groups) - sent

        result: tuple[bool, int] = await self._db(work)
        return result
