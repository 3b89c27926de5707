"""Live progress (``GET /v1/batches/{id}/events``) against the real processes, on both stacks.

The stream is read with httpx-sse, as any SSE client reads it; the mock upstream's
``[[mock:latency_ms=N]]`` directives spread a batch's jobs over a few seconds so that its
progress has steps to show. Pings are every second here (``PCQ_SSE_PING_SECONDS=1``) and a
tenant may hold two streams (``PCQ_SSE_MAX_STREAMS_PER_TENANT=2``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from pcq.tenants import create_key_at
from shell.procs import free_port, spawn, stop, wait_http
from tests.conftest import REDIS_TEST_URL
from tests.e2e.conftest import BOTH_STACKS, stack_database
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]

ENDED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module", params=BOTH_STACKS)
def sse_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    tmp = tmp_path_factory.mktemp("sse")
    db, env = stack_database(request, tmp, "module_pg_url")
    env.update(PCQ_SSE_PING_SECONDS="1", PCQ_SSE_MAX_STREAMS_PER_TENANT="2")
    s = Stack(env, tmp)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        yield s, db
    finally:
        s.stop_all()
        if request.param == "postgres+redis":
            client = redis.Redis.from_url(REDIS_TEST_URL)
            client.flushdb()
            client.close()


def tenant_key(db: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key_at(db, f'sse-{uuid.uuid4().hex[:8]}')}"}


def submit(s: Stack, h: dict[str, str], latencies_ms: list[int], fail: tuple[int, ...] = ()) -> str:
    """A batch whose job i answers after latencies_ms[i] (and fails at once if i is in fail)."""
    lines = []
    for i, ms in enumerate(latencies_ms):
        directive = "[[mock:status=400,times=1]]" if i in fail else f"[[mock:latency_ms={ms}]]"
        body = {
            "model": "lite",
            "messages": [{"role": "user", "content": f"q{i} {uuid.uuid4().hex} {directive}"}],
        }
        lines.append(json.dumps({"custom_id": f"c{i}", "body": body}))
    r = httpx.post(
        f"{s.api_url}/v1/batches",
        content="\n".join(lines) + "\n",
        headers={**h, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    batch_id: str = r.json()["id"]
    return batch_id


def events_url(s: Stack, batch_id: str) -> str:
    return f"{s.api_url}/v1/batches/{batch_id}/events"


def read_all(
    s: Stack, batch_id: str, h: dict[str, str], timeout: float = 60, **params: str
) -> list[ServerSentEvent]:
    """Every event of one connection, to the end of the stream."""
    with (
        httpx.Client(timeout=timeout) as client,
        connect_sse(client, "GET", events_url(s, batch_id), headers=dict(h), params=params) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def first_event(s: Stack, batch_id: str, h: dict[str, str], **params: str) -> ServerSentEvent:
    """The first event of a connection, which is then closed."""
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(client, "GET", events_url(s, batch_id), headers=dict(h), params=params) as source,
    ):
        assert source.response.status_code == 200
        return next(iter(source.iter_sse()))


def seq(event: ServerSentEvent) -> int:
    return int(event.id.split("-")[0])


def counts(event: ServerSentEvent) -> dict[str, int]:
    result: dict[str, int] = json.loads(event.data)["counts"]
    return result


def ended(event: ServerSentEvent) -> int:
    return sum(counts(event)[k] for k in ENDED)


def wait_until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_events_come_in_order_with_growing_counts_then_completed_and_the_stream_ends(
    sse_stack: tuple[Stack, str],
) -> None:
    s, db = sse_stack
    h = tenant_key(db)
    batch_id = submit(s, h, [0, 1000, 2000, 3000, 4000], fail=(1,))
    events = read_all(s, batch_id, h)  # returns only because the server ends the stream

    assert [e.event for e in events[:-1]] == ["batch.progress"] * (len(events) - 1)
    assert events[-1].event == "batch.completed"
    assert len(events) >= 3, [e.data for e in events]  # the jobs end seconds apart
    assert [seq(e) for e in events] == sorted({seq(e) for e in events})  # ids strictly increase
    assert [ended(e) for e in events] == sorted(ended(e) for e in events)
    assert all(counts(a) != counts(b) for a, b in zip(events, events[1:], strict=False))  # only changes
    final = json.loads(events[-1].data)
    assert final["done"]
    assert final["status"] == "completed"
    assert final["counts"] == {"queued": 0, "running": 0, "succeeded": 4, "failed": 1, "cancelled": 0}
    # The data is the batch exactly as GET /v1/batches/{id} shows it.
    assert final == httpx.get(f"{s.api_url}/v1/batches/{batch_id}", headers=h).json()


def test_a_completed_batch_sends_one_completed_event_then_204_to_a_client_that_saw_it(
    sse_stack: tuple[Stack, str],
) -> None:
    s, db = sse_stack
    h = tenant_key(db)
    batch_id = submit(s, h, [0, 0])
    wait_until(lambda: httpx.get(f"{s.api_url}/v1/batches/{batch_id}", headers=h).json()["done"])

    (event,) = read_all(s, batch_id, h)
    assert event.event == "batch.completed"
    assert event.id
    # Nothing is newer than the end: 204, which tells an EventSource to stop reconnecting.
    again = httpx.get(events_url(s, batch_id), headers={**h, "Last-Event-ID": event.id})
    assert again.status_code == 204
    assert (
        httpx.get(events_url(s, batch_id), params={"last_event_id": event.id}, headers=h).status_code == 204
    )
    # An id this API never sent is ignored: the stream starts afresh.
    (fresh,) = read_all(s, batch_id, {**h, "Last-Event-ID": "not-one-of-ours"})
    assert fresh.event == "batch.completed"


@pytest.mark.parametrize("via", ["header", "query"])
def test_a_reconnect_with_the_last_event_id_gets_only_newer_states(
    sse_stack: tuple[Stack, str], via: str
) -> None:
    s, db = sse_stack
    h = tenant_key(db)
    batch_id = submit(s, h, [0, 2500, 5000, 7500])

    def resume(last: ServerSentEvent) -> ServerSentEvent:
        if via == "header":
            return first_event(s, batch_id, {**h, "Last-Event-ID": last.id})
        return first_event(s, batch_id, h, last_event_id=last.id)

    seen = [first_event(s, batch_id, h)]  # connect, read one event, disconnect
    while seen[-1].event != "batch.completed":
        # Reconnecting at once, mostly before anything changed: the first event that comes is
        # a state this client has not seen, never the one it already has.
        seen.append(resume(seen[-1]))
        assert counts(seen[-1]) != counts(seen[-2])
        assert seq(seen[-1]) > seq(seen[-2])
        assert ended(seen[-1]) >= ended(seen[-2])
    assert counts(seen[-1])["succeeded"] == 4
    assert len(seen) >= 3


def test_a_retry_after_the_end_is_news_to_a_client_that_saw_the_end(sse_stack: tuple[Stack, str]) -> None:
    """A retry of failed jobs moves the counts backwards (failed -> queued); the client that saw
    the end still gets it, with a newer id, and a second end."""
    s, db = sse_stack
    h = tenant_key(db)
    batch_id = submit(s, h, [0, 0], fail=(1,))
    end = read_all(s, batch_id, h)[-1]
    assert counts(end)["failed"] == 1
    r = httpx.post(f"{s.api_url}/v1/batches/{batch_id}/retry-failed", headers=h)
    assert r.status_code == 202, r.text

    events = read_all(s, batch_id, {**h, "Last-Event-ID": end.id})
    assert events[-1].event == "batch.completed"
    assert counts(events[-1])["succeeded"] == 2  # the fault was for the first try only
    assert all(seq(e) > seq(end) for e in events)


def test_an_idle_stream_gets_a_ping_comment_every_ping_interval(sse_stack: tuple[Stack, str]) -> None:
    s, db = sse_stack
    h = tenant_key(db)
    batch_id = submit(s, h, [6000])
    lines: list[str] = []
    started = time.monotonic()
    with httpx.Client(timeout=30) as client, client.stream("GET", events_url(s, batch_id), headers=h) as resp:
        for line in resp.iter_lines():
            lines.append(line)
            if time.monotonic() - started > 3.5:
                break
    assert lines[0].startswith("id: ")
    assert lines.count(": ping") >= 2, lines  # the job runs for 6 s: nothing else to say


def test_another_tenants_batch_and_an_unknown_batch_answer_404_before_any_stream(
    sse_stack: tuple[Stack, str],
) -> None:
    s, db = sse_stack
    owner, other = tenant_key(db), tenant_key(db)
    batch_id = submit(s, owner, [0])
    for h, path in ((other, batch_id), (owner, "bat_nope")):
        r = httpx.get(events_url(s, path), headers=h)
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "not_found"
    assert httpx.get(events_url(s, batch_id)).status_code == 401


def test_streams_beyond_the_tenant_cap_answer_429_and_a_closed_stream_frees_its_slot(
    sse_stack: tuple[Stack, str],
) -> None:
    """Two streams held open, a third refused; once a client goes away its stream ends on the
    server (the slot comes back), so nothing leaks."""
    s, db = sse_stack
    h, other = tenant_key(db), tenant_key(db)
    batch_id = submit(s, h, [20000])
    with httpx.Client(timeout=30) as client:
        first = client.send(client.build_request("GET", events_url(s, batch_id), headers=h), stream=True)
        second = client.send(client.build_request("GET", events_url(s, batch_id), headers=h), stream=True)
        assert (first.status_code, second.status_code) == (200, 200)
        refused = httpx.get(events_url(s, batch_id), headers=h)
        assert refused.status_code == 429
        assert refused.json()["error"] == "too_many_streams"
        assert int(refused.headers["retry-after"]) >= 1
        other_batch = submit(s, other, [20000])  # another tenant is not affected
        with httpx.stream("GET", events_url(s, other_batch), headers=other) as resp:
            assert resp.status_code == 200
        first.close()
        second.close()

    def reopened() -> bool:
        with httpx.stream("GET", events_url(s, batch_id), headers=h) as resp:
            return resp.status_code == 200

    wait_until(reopened, timeout=10)
    with (
        httpx.stream("GET", events_url(s, batch_id), headers=h) as a,
        httpx.stream("GET", events_url(s, batch_id), headers=h) as b,
    ):
        assert (a.status_code, b.status_code) == (200, 200)  # both slots came back


def test_a_stream_resumes_on_another_api_process(sse_stack: tuple[Stack, str]) -> None:
    """The id is all a process needs: a second API process, which never saw this client,
    sends only states newer than the one the first process showed it."""
    s, db = sse_stack
    h = tenant_key(db)
    port = free_port()
    s.procs["api-b"] = spawn(["api", "--port", str(port)], s.env, s.log("api-b"), cwd=s.workdir)
    other = Stack(s.env, s.workdir, api_url=f"http://127.0.0.1:{port}")
    wait_http(f"{other.api_url}/healthz", proc=s.procs["api-b"])
    try:
        batch_id = submit(s, h, [0, 2000, 4000])
        seen = first_event(s, batch_id, h)
        rest = read_all(other, batch_id, {**h, "Last-Event-ID": seen.id})
        assert counts(rest[0]) != counts(seen)
        assert [seq(e) for e in rest] == sorted({seq(e) for e in rest})
        assert seq(rest[0]) > seq(seen)
        assert rest[-1].event == "batch.completed"
    finally:
        stop(s.procs.pop("api-b"))
