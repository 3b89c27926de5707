"""Per-tenant limits of the API, so that one tenant cannot take it down for the others.

**Request rate** (``PCQ_API_RATE_LIMIT_PER_MINUTE``, 0 = off). Every authenticated ``/v1``
request counts against its tenant (api.deps applies it right after authentication). One GCRA
budget per tenant (``pcq.gcra``, the algorithm of the workers' upstream limiter too): one Lua
script, run atomically by Redis, with ``redis.call('TIME')`` as the clock, so every API process
shares the budget and is judged on one clock. A tenant may spend a minute's worth at once (a
burst of ``N``) and then ``N`` per minute, evenly spaced; the ``N + 1``-st request of a burst
answers ``429 rate_limited`` with ``Retry-After`` (whole seconds, at least 1: when the next
request would pass).
State is one key per tenant, ``pcq:api:rl:<tenant id>`` (never the API key), holding the
theoretical arrival time in microseconds of Redis time and expiring as soon as it is in the past
(at most a minute after the tenant's last request). Without ``REDIS_URL`` the API is one process
and the same script runs on an in-process ``fakeredis``.

**Fail open.** The limiter protects the API; an outage of the limiter must not become an outage
of the API. If Redis does not answer (refused, timed out, any Redis error), the request passes
unchecked, a warning is logged, and Redis is not asked again for ``pause`` seconds (5), so every
request does not wait for a timeout, and the warning comes at most once per pause.

**Queued jobs** (``PCQ_TENANT_MAX_QUEUED``, 0 = off). A submission or a retry that would take the
tenant's queued and running jobs above the cap answers ``429 too_many_queued`` and stores nothing.
``QueueCap.check`` runs inside the transaction that inserts (or requeues) the jobs, just before
it commits: it counts the tenant's queued and running jobs, the new ones included, with one query
on the index ``jobs(tenant_id, status, id)``, and raises if they exceed the cap, which rolls the
whole transaction back (a JSONL batch, whose size is known only at its end, is rejected whole).
On PostgreSQL the count is taken under a per-tenant transaction-level advisory lock, so two
concurrent submissions of one tenant cannot both pass on counts that omit each other (the second
counts after the first committed); SQLite serialises writers anyway.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.orm import Session

from pcq.gcra import LUA_PRELUDE, interval_us
from pcq.jobs.errors import RateLimited, TooManyQueued
from pcq.repositories import jobs as job_rows
from pcq.settings import Settings

log = logging.getLogger(__name__)

_US: Final = 1_000_000

# KEYS[1] = the tenant's TAT key; ARGV[1] = emission interval T (us), ARGV[2] = tolerance tau (us).
# Returns 0 when admitted (and takes the slot), else the microseconds until a request would pass.
GCRA_SCRIPT: Final = (
    LUA_PRELUDE
    + """
local slot, new_tat = gcra_slot(gcra_tat(KEYS[1]), tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if slot > now then return slot - now end
gcra_store(KEYS[1], new_tat)
return 0
"""
)


class TenantRateLimiter:
    """``limit_per_minute`` authenticated requests per tenant, shared through Redis; fails open.

    ``client`` is a synchronous ``redis.Redis`` (or ``fakeredis.FakeRedis``); ``check`` is
    called from the threadpool that runs the API's synchronous dependencies.
    """

    def __init__(
        self, client: Any, *, limit_per_minute: int, prefix: str = "pcq:api:rl:", pause: float = 5.0
    ) -> None:
        if limit_per_minute < 1:
            raise ValueError("limit_per_minute must be >= 1")
        self.limit_per_minute = limit_per_minute
        self.prefix = prefix
        self.pause = pause
        # Rounded up, so rounding can only make the limiter stricter. A burst of a full minute.
        self._interval_us = interval_us(limit_per_minute)
        self._tolerance_us = (limit_per_minute - 1) * self._interval_us
        self._script = client.register_script(GCRA_SCRIPT)
        self._lock = threading.Lock()
        self._skip_until = 0.0  # time.monotonic(): Redis failed, do not ask it before then
        self._warned_at = -math.inf

    def key(self, tenant_id: str) -> str:
        return f"{self.prefix}{tenant_id}"

    def wait(self, tenant_id: str) -> float:
        """Count one request: 0.0 if it may pass (the slot is taken), else the seconds until
        one would. 0.0 as well when Redis cannot be asked (fail open)."""
        if time.monotonic() < self._skip_until:
            return 0.0
        try:
            wait_us = self._script(keys=[self.key(tenant_id)], args=[self._interval_us, self._tolerance_us])
        except Exception as exc:  # any failure of the limiter lets the request through
            self._failed(exc)
            return 0.0
        return int(wait_us) / _US

    def check(self, tenant_id: str) -> None:
        """Count one request of ``tenant_id``; raise RateLimited (429) beyond the limit."""
        wait = self.wait(tenant_id)
        if wait > 0:
            raise RateLimited(
                f"more than {self.limit_per_minute} requests per minute for this tenant; "
                f"retry after {max(1, math.ceil(wait))} s",
                retry_after=wait,
            )

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + self.pause
            if now - self._warned_at < self.pause:
                return
            self._warned_at = now
        log.warning(
            "API rate limiter unavailable (%s); requests pass unchecked, Redis asked again in %.0f s",
            type(exc).__name__,
            self.pause,
        )


def build_rate_limiter(settings: Settings, redis_client: Any | None) -> TenantRateLimiter | None:
    """The API's rate limiter: on ``redis_client`` (REDIS_URL), else on an in-process fakeredis
    (embedded mode runs one API process); None when ``PCQ_API_RATE_LIMIT_PER_MINUTE`` is 0."""
    if settings.api_rate_limit_per_minute <= 0:
        return None
    client = redis_client
    if client is None:
        import fakeredis

        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return TenantRateLimiter(client, limit_per_minute=settings.api_rate_limit_per_minute)


_MAX_RETRY_AFTER: Final = 3600


@dataclass(frozen=True)
class QueueCap:
    """``limit`` queued + running jobs per tenant (0 = off).

    ``drain_per_minute`` (the upstream requests per minute of the whole key pool) only shapes the
    ``Retry-After`` hint: the time the excess would take to run if it had the quota to itself.
    """

    limit: int = 0
    drain_per_minute: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueCap:
        pool_rate = sum(k.rate_limit_per_minute for k in settings.key_pool())
        return cls(limit=settings.tenant_max_queued, drain_per_minute=pool_rate)

    def check(self, session: Session, tenant_id: str, added: int) -> None:
        """Call inside the transaction that just queued ``added`` jobs of the tenant, before it
        commits; raises TooManyQueued (429) when they took the tenant over the cap, so that the
        transaction rolls back. Does nothing when off or when nothing was added (a replay)."""
        if self.limit <= 0 or added <= 0:
            return
        # On PostgreSQL, a lock held until this transaction ends: a concurrent submission of the
        # tenant counts after it.
        job_rows.lock_active_count(session, tenant_id)
        count = job_rows.count_active(session, tenant_id)
        if count <= self.limit:
            return
        before = max(0, count - added)
        if added > self.limit:
            detail = (
                f"this submission alone queues {added} jobs, more than this tenant's cap of "
                f"{self.limit} queued or running jobs; split it. Nothing was stored"
            )
        else:
            detail = (
                f"this tenant has {before} queued or running jobs and this request would add "
                f"{added}, over its cap of {self.limit}; nothing was stored. Retry once jobs have "
                "finished (or cancel some)"
            )
        excess = count - self.limit
        retry_after = excess * 60 / self.drain_per_minute if self.drain_per_minute > 0 else 60.0
        raise TooManyQueued(detail, retry_after=min(float(_MAX_RETRY_AFTER), retry_after))
