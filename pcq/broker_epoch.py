"""Noticing that the broker's Redis lost its data, so that lost messages are sent again in seconds.

Why: a job's message lives only in Redis. The database knows that a job was sent
(``enqueued_at``), not whether its message still exists, so a single lost message is noticed
only once it is ``PCQ_REQUEUE_AFTER_SECONDS`` old (300 s by default) and the queue is empty. A
``FLUSHALL``, or a Redis restart without persistence, loses every message at once, though,
and that can be seen: it also loses a key that pcq put there.

How: a marker key, ``pcq:broker-epoch:<queue>``, in the broker's Redis (no TTL). Its value
names an *epoch*: a random id and the time the epoch began. Every sweep reads it (one GET):

- the value this process saw last time: nothing was lost, nothing extra is sent;
- missing: Redis lost its data. The sweeper writes a new epoch that begins now (``SET NX``:
  when several sweepers notice at once, one of them writes it and the others read it);
- another value (another process wrote it first, or this process is new): take it.

A process that meets an epoch new to it re-sends, at once, every queued job that is due and
whose message was sent before the epoch began, and every running job with an expired lease
(``lifecycle.due_for_enqueue(lost_before=...)``), in chunks until none is left. The database
makes this once per loss for the whole fleet: a re-sent job is marked as sent after the epoch
began, so the next sweeper that meets the same epoch finds it already sent. A duplicate
message would be harmless anyway: its copy fails the claim.

Every process that sends (the API, a worker) also makes sure a marker exists when it starts
(``ensure``, from ``pcq.queue.Enqueuer``; if Redis is away then, before its first message): a
worker that starts after the API has accepted jobs must not take their messages for lost ones.
A Redis that never held a marker (the first start after upgrading to a pcq that writes one)
still looks like one that lost its data: jobs sent before then are sent once more, and those
copies fail their claim.

A Redis that cannot be reached is not a loss: the GET fails, and the next sweep asks again.
Only Redis brokers are checked: the embedded SQLite broker cannot lose its messages this way.
An evicting ``maxmemory-policy`` could evict the marker and cause such a harmless re-send;
pcq wants ``noeviction`` anyway.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pcq.models import utcnow
from pcq.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "pcq:broker-epoch:"


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


class BrokerEpoch:
    """The marker of one queue in the broker's Redis, and the epoch this process saw last."""

    def __init__(self, client: Any, queue_name: str) -> None:
        self.client = client  # a synchronous redis.Redis (or fakeredis.FakeRedis)
        self.key = KEY_PREFIX + queue_name
        self._seen: str | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> BrokerEpoch | None:
        """The marker of the configured broker, or None for a broker that is not Redis."""
        return cls.for_broker(settings.effective_broker_url, settings.queue_name)

    @classmethod
    def for_broker(cls, url: str | None, queue_name: str) -> BrokerEpoch | None:
        if not url or not is_redis_url(url):
            return None
        try:
            # Fail fast while Redis is away (a sweep must go on); one immediate retry replaces
            # a connection that a Redis restart closed.
            client = redis.Redis.from_url(
                url, socket_connect_timeout=3, socket_timeout=3, retry=Retry(NoBackoff(), 1)
            )
        except ValueError as exc:  # a broker URL kombu reads and redis-py does not
            log.warning("no broker epoch marker for this broker URL: %s", exc)
            return None
        return cls(client, queue_name)

    def check(self, now: datetime | None = None) -> datetime | None:
        """When the epoch new to this process began, or None if this process has seen it.

        Messages sent before the returned time may have been lost. None also when Redis
        cannot be reached: that is not a loss, and the next check asks again.
        """
        try:
            value = self._current(now)
        except (redis.RedisError, OSError) as exc:
            log.debug("broker epoch unknown: %s", type(exc).__name__)
            return None
        if value is None or value == self._seen:
            return None
        self._seen = value
        return _began(value)

    def ensure(self, now: datetime | None = None) -> bool:
        """Write a marker if there is none (a process about to send calls this first, so that
        a worker starting later does not take its messages for lost ones); False if Redis
        cannot be reached."""
        try:
            return self._current(now) is not None
        except (redis.RedisError, OSError) as exc:
            log.debug("broker epoch unknown: %s", type(exc).__name__)
            return False

    def _current(self, now: datetime | None) -> str | None:
        """The marker's value; a new epoch that begins now if it was missing."""
        value = self.client.get(self.key)
        if value is None:
            began = now or utcnow()
            fresh = f"{uuid.uuid4().hex} {began.isoformat()}"
            if self.client.set(self.key, fresh, nx=True):
                log.info(
                    "new broker epoch: %s was missing (Redis lost its data, or never had "
                    "it); jobs sent before %s may have lost their message",
                    self.key,
                    began.isoformat(),
                )
                return fresh
            value = self.client.get(self.key)  # another process wrote it first: take it
            if value is None:  # lost again in between: the next check sees it
                return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.client.close()


def _began(value: str) -> datetime | None:
    """The start of the epoch a marker value names; None if the value is not one of ours."""
    try:
        began = datetime.fromisoformat(value.split(" ", 1)[1])
    except (IndexError, ValueError):
        log.warning("broker epoch marker has an unexpected value; ignored")
        return None
    return began if began.tzinfo is not None else began.replace(tzinfo=UTC)
