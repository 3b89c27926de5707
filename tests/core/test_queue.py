"""The enqueuer: never raises, and stops knocking on a broker that is down for a while."""

from __future__ import annotations

import time
import uuid

import fakeredis
import pytest

from pcq.queue import DispatchWake, Enqueuer, make_celery, open_key, wake_key
from tests.conftest import make_settings


def test_enqueue_to_an_unreachable_broker_returns_zero_then_answers_at_once() -> None:
    settings = make_settings(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    enqueuer = Enqueuer(make_celery(settings, publisher=True), settings.queue_name, pause_seconds=30)
    started = time.monotonic()
    assert enqueuer.enqueue(["job_a", "job_b"]) == 0
    assert time.monotonic() - started < 3  # the API's publisher gives up quickly
    started = time.monotonic()
    assert enqueuer.enqueue(["job_c"]) == 0
    assert time.monotonic() - started < 0.05


def test_messages_are_chunks_of_ids_through_the_default_exchange() -> None:
    settings = make_settings(PCQ_BROKER_URL="memory://", PCQ_QUEUE_NAME="pcq-chunks")
    app = make_celery(settings)
    ids = [f"job_{i}" for i in range(120)]
    assert Enqueuer(app, settings.queue_name).enqueue(ids, per_message=50) == 120
    got = []
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("pcq-chunks")
        while True:
            try:
                msg = queue.get(block=False)
            except queue.Empty:
                break
            assert msg.delivery_info.get("exchange", "") == ""
            got.append(msg.payload[0][0])
            msg.ack()
    assert [len(chunk) for chunk in got] == [50, 50, 20]
    assert [i for chunk in got for i in chunk] == ids


@pytest.mark.realservices
def test_backlog_counts_the_messages_waiting_in_redis(redis_url: str) -> None:
    settings = make_settings(REDIS_URL=redis_url, PCQ_QUEUE_NAME=f"pcq-backlog-{uuid.uuid4().hex[:8]}")
    enqueuer = Enqueuer(make_celery(settings, publisher=True), settings.queue_name)
    assert enqueuer.backlog() == 0
    assert enqueuer.enqueue([f"job_{i}" for i in range(120)]) == 120
    assert enqueuer.backlog() == 3  # 50 + 50 + 20 ids


def test_backlog_of_an_unreachable_broker_is_unknown() -> None:
    settings = make_settings(REDIS_URL="redis://127.0.0.1:1/0")
    enqueuer = Enqueuer(make_celery(settings, publisher=True), settings.queue_name, pause_seconds=30)
    assert enqueuer.backlog() is None


def test_a_wake_leaves_one_entry_and_the_open_flag_is_read_until_redis_fails() -> None:
    client = fakeredis.FakeRedis()
    wake = DispatchWake(client, "q")
    wake()
    wake()
    assert client.llen(wake_key("q")) == 1  # a hint, not a count: the dispatcher reads the database
    assert not wake.is_open()
    client.set(open_key("q"), 1, px=2000)
    assert wake.is_open()

    class Down:
        def exists(self, _key: str) -> int:
            raise ConnectionError("refused")

        def pipeline(self, transaction: bool = True) -> None:
            raise ConnectionError("refused")

    broken = DispatchWake(Down(), "q", pause_seconds=60)
    assert not broken.is_open()  # unsure: the dispatcher sends it
    broken()  # a failed wake is only logged
    assert DispatchWake(None, "q").is_open() is False  # embedded mode: no Redis
