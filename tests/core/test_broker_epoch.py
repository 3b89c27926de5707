"""The broker-epoch marker: a broker that lost its data gets every lost job back in one sweep.

Fast: the marker lives in fakeredis, the jobs in SQLite (and the real PostgreSQL), and the
sweeps run the engine's own ``sweep_once`` with an enqueuer that only records what it sends.
See pcq/broker_epoch.py for the design.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import fakeredis
import pytest
import redis
from sqlalchemy import insert

from pcq.broker_epoch import KEY_PREFIX, BrokerEpoch
from pcq.db import SessionFactory, unit_of_work
from pcq.models import Job, new_id, utcnow
from pcq.queue import Enqueuer, make_celery
from pcq.tenants import create_key
from tests.conftest import make_settings
from worker.engine import SWEEP_CHUNK, Engine

QUEUE = "pcq-epoch-test"


class RecordingEnqueuer:
    """Stands in for pcq.queue.Enqueuer: records the ids it is asked to send."""

    def __init__(self, backlog: int | None = 0) -> None:
        self.sent: list[str] = []
        self._backlog = backlog

    def backlog(self) -> int | None:
        return self._backlog

    def enqueue(self, job_ids: list[str]) -> int:
        self.sent += job_ids
        return len(job_ids)


class Sweeper:
    """One worker's sweeper (the engine's, never started) with its own view of the marker."""

    def __init__(self, sessions: SessionFactory, client: Any, *, backlog: int | None = 0) -> None:
        settings = make_settings(REDIS_URL="redis://127.0.0.1:1/0", PCQ_QUEUE_NAME=QUEUE)
        self.enqueuer = RecordingEnqueuer(backlog)
        self.engine = Engine(settings, sessions, self.enqueuer, lambda: None)  # type: ignore[arg-type]
        assert self.engine._broker_epoch is not None  # a Redis broker has a marker
        self.epoch = BrokerEpoch(client, QUEUE)
        self.engine._broker_epoch = self.epoch

    def sweep(self) -> list[str]:
        before = len(self.enqueuer.sent)
        self.engine._loop.run_until_complete(self.engine.sweep_once())
        return self.enqueuer.sent[before:]

    def close(self) -> None:
        self.engine._db_pool.shutdown(wait=True)
        self.engine._loop.close()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def sweepers(sessions: SessionFactory, server: fakeredis.FakeServer) -> Iterator[list[Sweeper]]:
    made = [Sweeper(sessions, client(server)), Sweeper(sessions, client(server))]
    yield made
    for s in made:
        s.close()


def add_jobs(
    sessions: SessionFactory,
    n: int,
    *,
    enqueued_at: datetime | None,
    status: str = "queued",
    lease_until: datetime | None = None,
    next_attempt_at: datetime | None = None,
) -> list[str]:
    now = utcnow()
    with unit_of_work(sessions) as s:
        tenant, _ = create_key(s, "epoch", "")
        rows = [
            {
                "id": new_id("job"),
                "tenant_id": tenant.id,
                "request_json": '{"model": "lite", "messages": []}',
                "model": "lite",
                "status": status,
                "attempts": 1 if status == "running" else 0,
                "lease_until": lease_until,
                "next_attempt_at": next_attempt_at,
                "enqueued_at": enqueued_at,
                "created_at": now,
                "updated_at": now,
            }
            for _ in range(n)
        ]
        s.execute(insert(Job), rows)
    return [r["id"] for r in rows]


def flush(server: fakeredis.FakeServer) -> None:
    client(server).flushall()


# ---------------------------------------------------------------------- the marker alone


def test_the_marker_is_written_once_and_a_missing_marker_starts_a_new_epoch(
    server: fakeredis.FakeServer,
) -> None:
    marker = BrokerEpoch(client(server), QUEUE)
    t0 = utcnow()
    first = marker.check(now=t0)
    assert first == t0  # no marker yet: messages sent before now may be gone
    value = client(server).get(KEY_PREFIX + QUEUE)
    assert value is not None
    assert client(server).ttl(KEY_PREFIX + QUEUE) == -1  # no TTL
    assert marker.check() is None  # unchanged: nothing lost
    assert marker.check() is None
    flush(server)
    t1 = t0 + timedelta(seconds=5)
    assert marker.check(now=t1) == t1
    assert client(server).get(KEY_PREFIX + QUEUE) != value  # a new epoch id
    assert marker.check() is None


def test_two_processes_agree_on_one_epoch_per_loss(server: fakeredis.FakeServer) -> None:
    a, b = BrokerEpoch(client(server), QUEUE), BrokerEpoch(client(server), QUEUE)
    t0 = utcnow()
    assert a.check(now=t0) == t0
    assert b.check(now=t0 + timedelta(seconds=1)) == t0  # b takes a's epoch, does not write one
    flush(server)
    t1 = t0 + timedelta(seconds=10)
    assert b.check(now=t1) == t1  # b notices first and writes the new epoch
    value = client(server).get(KEY_PREFIX + QUEUE)
    assert a.check(now=t1 + timedelta(seconds=1)) == t1  # a takes it
    assert client(server).get(KEY_PREFIX + QUEUE) == value
    assert a.check() is None
    assert b.check() is None


def test_a_sweeper_that_loses_the_race_to_write_the_marker_takes_the_winners_epoch(
    server: fakeredis.FakeServer,
) -> None:
    winner = BrokerEpoch(client(server), QUEUE)

    class Racing(fakeredis.FakeRedis):
        """Saw no marker, but the winner writes one before this client's SET NX."""

        raced = False

        def get(self, name: Any) -> Any:
            if not self.raced:
                self.raced = True
                assert winner.check(now=t_winner) == t_winner
                return None
            return super().get(name)

    t_winner = utcnow()
    loser = BrokerEpoch(Racing(server=server), QUEUE)
    assert loser.check(now=t_winner + timedelta(seconds=1)) == t_winner
    assert winner.check() is None


def test_an_unreachable_redis_is_not_a_loss() -> None:
    settings = make_settings(REDIS_URL="redis://127.0.0.1:1/0", PCQ_QUEUE_NAME=QUEUE)
    marker = BrokerEpoch.for_settings(settings)
    assert marker is not None
    assert marker.check() is None  # connection refused: unknown, not lost
    marker.close()


def test_only_redis_brokers_have_a_marker() -> None:
    assert BrokerEpoch.for_settings(make_settings()) is None  # the embedded SQLite broker
    assert BrokerEpoch.for_settings(make_settings(PCQ_BROKER_URL="memory://")) is None
    assert BrokerEpoch.for_settings(make_settings(REDIS_URL="rediss://127.0.0.1:1/0")) is not None


def test_ensure_writes_a_marker_only_when_there_is_none(server: fakeredis.FakeServer) -> None:
    sender = BrokerEpoch(client(server), QUEUE)
    assert sender.ensure()
    value = client(server).get(KEY_PREFIX + QUEUE)
    assert sender.ensure()
    assert client(server).get(KEY_PREFIX + QUEUE) == value
    unreachable = BrokerEpoch.for_broker("redis://127.0.0.1:1/0", QUEUE)
    assert unreachable is not None
    assert not unreachable.ensure()


@pytest.mark.realservices
def test_an_enqueuer_writes_the_marker_before_it_sends(redis_url: str) -> None:
    queue = f"{QUEUE}-{new_id('q')}"
    settings = make_settings(REDIS_URL=redis_url, PCQ_QUEUE_NAME=queue)
    Enqueuer(make_celery(settings, publisher=True), queue)
    with redis.Redis.from_url(redis_url) as r:
        assert r.get(KEY_PREFIX + queue) is not None
        r.delete(KEY_PREFIX + queue)


@pytest.mark.realservices
def test_the_marker_on_a_real_redis(redis_url: str) -> None:
    queue = f"{QUEUE}-{new_id('q')}"
    settings = make_settings(REDIS_URL=redis_url, PCQ_QUEUE_NAME=queue)
    marker = BrokerEpoch.for_settings(settings)
    assert marker is not None
    try:
        assert marker.check() is not None
        assert marker.check() is None
        with redis.Redis.from_url(redis_url) as r:
            r.delete(KEY_PREFIX + queue)  # what a FLUSHALL does to it
        assert marker.check() is not None
        assert marker.check() is None
    finally:
        marker.close()


# ------------------------------------------------------------------------ with sweeps


def test_in_the_normal_case_nothing_extra_is_sent(sessions: SessionFactory, sweepers: list[Sweeper]) -> None:
    a, b = sweepers
    assert a.sweep() == []  # the first sweeps agree on an epoch
    assert b.sweep() == []
    waiting = add_jobs(sessions, 20, enqueued_at=utcnow())  # sent: their messages are in Redis
    unsent = add_jobs(sessions, 2, enqueued_at=None)  # never sent: the dispatcher sends them
    assert a.sweep() == []
    assert len(unsent) == 2
    for _ in range(3):  # the 20 sent jobs are left alone: their messages wait their turn
        assert a.sweep() == []
        assert b.sweep() == []
    assert len(waiting) == 20


def test_jobs_sent_after_a_sender_wrote_the_marker_are_not_taken_for_lost(
    sessions: SessionFactory, server: fakeredis.FakeServer, sweepers: list[Sweeper]
) -> None:
    a, _ = sweepers
    # The API started (and wrote the marker) before it accepted these; no worker ran yet.
    assert BrokerEpoch(client(server), QUEUE).ensure(now=utcnow() - timedelta(seconds=1))
    add_jobs(sessions, 10, enqueued_at=utcnow())
    assert a.sweep() == []  # the first worker meets the epoch: nothing was sent before it


def test_a_redis_that_never_held_a_marker_counts_as_one_that_lost_its_data(
    sessions: SessionFactory, sweepers: list[Sweeper]
) -> None:
    a, b = sweepers
    ids = add_jobs(sessions, 10, enqueued_at=utcnow() - timedelta(seconds=1))
    assert sorted(a.sweep()) == sorted(ids)  # may have been lost with the broker: sent again
    assert b.sweep() == []


def test_after_a_flush_every_job_sent_before_it_is_sent_again_at_once(
    sessions: SessionFactory, server: fakeredis.FakeServer, sweepers: list[Sweeper]
) -> None:
    a, _ = sweepers
    a.sweep()
    past = utcnow() - timedelta(seconds=1)
    queued = add_jobs(sessions, 5, enqueued_at=past)
    expired = add_jobs(sessions, 2, enqueued_at=past, status="running", lease_until=past)
    live = add_jobs(sessions, 2, enqueued_at=past, status="running", lease_until=past + timedelta(hours=1))
    later = add_jobs(sessions, 2, enqueued_at=past, next_attempt_at=past + timedelta(hours=1))
    assert a.sweep() == []
    flush(server)
    # Young messages (far below PCQ_REQUEUE_AFTER_SECONDS), a queue that is not empty: the
    # loss alone makes them due.
    a.enqueuer._backlog = 7
    # Not the jobs under a live lease, nor the retries not yet due.
    assert sorted(a.sweep()) == sorted(queued + expired)
    assert not set(live + later) & set(a.enqueuer.sent)
    assert a.sweep() == []


def test_two_sweepers_noticing_the_same_loss_send_it_once(
    sessions: SessionFactory, server: fakeredis.FakeServer, sweepers: list[Sweeper]
) -> None:
    a, b = sweepers
    a.sweep()
    b.sweep()
    ids = add_jobs(sessions, 30, enqueued_at=utcnow() - timedelta(seconds=1))
    flush(server)
    assert sorted(b.sweep()) == sorted(ids)  # b notices first, writes the epoch, sends all
    value = client(server).get(KEY_PREFIX + QUEUE)
    assert a.sweep() == []  # a meets the same epoch: everything is already sent again
    assert client(server).get(KEY_PREFIX + QUEUE) == value  # one epoch for the loss
    assert a.sweep() == []
    assert b.sweep() == []


def test_a_loss_of_more_than_one_chunk_is_sent_again_in_one_sweep(
    sessions: SessionFactory, server: fakeredis.FakeServer, sweepers: list[Sweeper]
) -> None:
    a, _ = sweepers
    a.sweep()
    n = 2 * SWEEP_CHUNK + 500
    ids = add_jobs(sessions, n, enqueued_at=utcnow() - timedelta(seconds=1))
    after = add_jobs(sessions, 3, enqueued_at=utcnow() + timedelta(minutes=1))  # sent after the loss
    flush(server)
    sent = a.sweep()
    assert len(sent) == n
    assert set(sent) == set(ids)
    assert not set(after) & set(sent)
    assert a.sweep() == []


def test_concurrent_sweepers_share_a_loss_without_sending_a_job_twice(
    db_url: str, sessions: SessionFactory, server: fakeredis.FakeServer, sweepers: list[Sweeper]
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite serialises writers after their reads: PostgreSQL skips locked rows")
    a, b = sweepers
    a.sweep()
    b.sweep()
    ids = add_jobs(sessions, 3 * SWEEP_CHUNK, enqueued_at=utcnow() - timedelta(seconds=1))
    flush(server)
    a.epoch.check()  # a writes the new epoch; b meets it: both sweep for the loss at once
    a.epoch._seen = None
    start = threading.Barrier(2)
    results: dict[str, list[str]] = {}

    def run(name: str, sweeper: Sweeper) -> None:
        start.wait()
        results[name] = sweeper.sweep()

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sent = results["a"] + results["b"]
    assert sorted(sent) == sorted(ids)  # every job once, none twice


def test_a_sweep_with_redis_down_does_not_fail_and_sends_nothing_extra(
    sessions: SessionFactory,
) -> None:
    settings = make_settings(REDIS_URL="redis://127.0.0.1:1/0", PCQ_QUEUE_NAME=QUEUE)
    enqueuer = RecordingEnqueuer(backlog=None)
    engine = Engine(settings, sessions, enqueuer, lambda: None)  # type: ignore[arg-type]
    try:
        add_jobs(sessions, 3, enqueued_at=utcnow())
        assert engine._loop.run_until_complete(engine.sweep_once()) == 0
        assert engine._lost_before is None
    finally:
        engine._db_pool.shutdown(wait=True)
        engine._loop.close()
