"""The pure parts of the event stream (api/events.py): its ids and the per-tenant cap. The
stream itself runs against real processes in tests/e2e/test_events.py."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import OperationalError

from api.events import EventId, StreamSlots, batch_events, nothing_new, state_of
from pcq.jobs.errors import TooManyStreams
from pcq.models import Batch

ENDED = {"queued": 0, "running": 0, "succeeded": 3, "failed": 1, "cancelled": 0}
UNDER_WAY = {"queued": 1, "running": 1, "succeeded": 2, "failed": 0, "cancelled": 0}


def test_an_event_id_names_when_and_the_counts_shown_and_reads_back() -> None:
    event_id = EventId(1795977988025, state_of(UNDER_WAY))
    assert str(event_id) == "1795977988025-1.1.2.0.0"  # queued.running.succeeded.failed.cancelled
    assert EventId.parse(str(event_id)) == event_id


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "abc",
        "12-1.2.3",
        "12-1.2.3.4.5.6",
        "-1.1.1.1.1",
        "x-1.1.1.1.1",
        "1-1.1.-1.1.1",
        "\u00b2-1.1.1.1.1",
        "1-1.1.1.1.\u0663",
        "9" * 300,
    ],
)
def test_an_id_this_api_did_not_send_is_ignored(text: str | None) -> None:
    assert EventId.parse(text) is None


def test_only_the_final_state_already_seen_leaves_nothing_to_send() -> None:
    seen_end = EventId(1, state_of(ENDED))
    assert nothing_new(ENDED, 4, seen_end)
    assert not nothing_new(ENDED, 4, None)  # a first connection gets the end
    assert not nothing_new(ENDED, 4, EventId(1, state_of(UNDER_WAY)))  # the end is news
    assert not nothing_new(UNDER_WAY, 4, EventId(1, state_of(UNDER_WAY)))  # not ended: wait for news


def test_a_tenant_holds_at_most_its_streams_and_a_released_slot_is_free_again() -> None:
    slots = StreamSlots(per_tenant=2)
    first, _ = slots.take("acme"), slots.take("acme")
    with pytest.raises(TooManyStreams) as refused:
        slots.take("acme")
    assert refused.value.retry_after >= 1
    slots.take("globex")  # another tenant has its own
    first()
    first()  # giving a slot back twice frees it once
    slots.take("acme")
    with pytest.raises(TooManyStreams):
        slots.take("acme")


def test_a_database_that_stops_answering_ends_the_stream_after_what_it_sent() -> None:
    """Past the first event a 503 can no longer be sent: the stream ends (the client resumes
    with its last id) instead of failing in the middle of the response."""

    def load() -> dict[str, int]:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    async def collect() -> list[bytes]:
        batch = Batch(id="bat_x", total=4, created_at=datetime.now(UTC))
        stream = batch_events(batch, UNDER_WAY, load, last=None, ping_seconds=60, draining=threading.Event())
        return [chunk async for chunk in stream]

    (only,) = asyncio.run(collect())
    assert only.startswith(b"id: ")
    assert b"event: batch.progress" in only
