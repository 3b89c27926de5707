"""One tenant cannot take the API down: stalled uploads and large batches beside a normal tenant.

A real ``pcq api`` process on PostgreSQL and a private Redis. Hostile tenants open 40 uploads
that declare a large body and then stop sending, and send 8 JSON batches of the largest size
allowed at once (each refused at its last item, so the whole body is read). Meanwhile another
tenant keeps reading and submitting. Everything talks to 127.0.0.1 only and ends on its own.

Checked: every request of the other tenant answers 2xx within 2 s; the API's resident memory
stays under 300 MB; the stalled uploads get 408 (or 429 beyond the upload limits) and hold no
database connection; afterwards the pool is whole (as many concurrent reads as it has
connections all answer) and no connection is left idle in a transaction.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from pcq.db import make_engine
from pcq.tenants import create_key_at
from tests.faults.helpers import PrivateRedis, fault_env
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]

UPLOAD_TIMEOUT = 8  # seconds a stalled upload is given (PCQ_UPLOAD_TIMEOUT_SECONDS)
STALLS = 40
BIG_BATCHES = 8
RSS_GOAL_MB = 300
# The largest body allowed here; shipped default is 256 MiB, which ops/bench/uploads.py measures
# (8 x 256 MiB take about a minute on 2 cores: too long for every CI run).
BATCH_BYTES = 32 * 1024 * 1024
REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stall(port: int, key: str) -> socket.socket:
    """An upload that declares 10 MB, sends the start of one line, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=UPLOAD_TIMEOUT * 3)
    head = (
        "POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/x-ndjson\r\n"
        "Content-Length: 10000000\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"custom_id": "a", "body": {"model": "lite", "messages": [')
    return sock


def status_of(sock: socket.socket) -> int | None:
    """The status the server answered on a stalled upload (None: it closed without one)."""
    try:
        data = sock.recv(256)
    except OSError:
        return None
    finally:
        sock.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split()[1])


def big_json_batch(size: int) -> bytes:
    """A JSON batch of about ``size`` bytes whose last item is invalid (an unknown model)."""
    message = {"role": "user", "content": "y" * 4000}
    item = json.dumps({"custom_id": "x", "body": {**REQ, "messages": [message]}})
    per = len(item) + 10  # the separator and a longer custom_id
    n = max(1, size // per - 1)
    items = [item.replace('"x"', f'"c{i}"', 1) for i in range(n)]
    items.append(json.dumps({"custom_id": "last", "body": {**REQ, "model": "nonexistent"}}))
    return ('{"requests": [' + ", ".join(items) + "]}").encode()


@pytest.mark.timeout(180)
def test_stalled_uploads_and_large_batches_do_not_hurt_another_tenant(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis
) -> None:
    env = fault_env(
        pg_url,
        private_redis.url,
        PCQ_UPLOAD_TIMEOUT_SECONDS=str(UPLOAD_TIMEOUT),
        PCQ_MAX_UPLOADS="64",  # room for all 48 hostile uploads: the test is about what they hold
        PCQ_MAX_BATCH_BYTES=str(BATCH_BYTES),
    )
    stack = Stack(env, tmp_path)
    engine = make_engine(pg_url)
    socks: list[socket.socket] = []
    try:
        stack.start_api()
        api_pid = stack.procs["api"].pid
        port = int(stack.api_url.rsplit(":", 1)[1])
        hostile = [create_key_at(pg_url, f"hostile-{i}") for i in range(STALLS // 4 + BIG_BATCHES)]
        victim = {"Authorization": f"Bearer {create_key_at(pg_url, 'victim')}"}
        body = big_json_batch(BATCH_BYTES - 1024)
        baseline_mb = rss_mb(api_pid)

        peak = [baseline_mb]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(api_pid))
                time.sleep(0.05)

        big_status: list[int] = []

        def send_big(key: str) -> None:
            r = httpx.post(
                f"{stack.api_url}/v1/batches",
                content=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                timeout=60,
            )
            big_status.append(r.status_code)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        socks = [stall(port, hostile[i // 4]) for i in range(STALLS)]
        bigs = [
            threading.Thread(target=send_big, args=(hostile[STALLS // 4 + i],), daemon=True)
            for i in range(BIG_BATCHES)
        ]
        for t in bigs:
            t.start()

        # The other tenant reads and submits the whole time the hostile load lasts.
        latencies: list[float] = []
        failures: list[str] = []
        with httpx.Client(base_url=stack.api_url, headers=victim, timeout=10) as client:
            deadline = time.monotonic() + UPLOAD_TIMEOUT + 4
            n = 0
            while time.monotonic() < deadline or any(t.is_alive() for t in bigs):
                n += 1
                for method, path, kw in (
                    ("GET", "/v1/jobs", {"params": {"limit": 10}}),
                    ("POST", "/v1/jobs", {"json": {"request": REQ, "custom_id": f"v{n}"}}),
                ):
                    t0 = time.monotonic()
                    r = client.request(method, path, **kw)
                    latencies.append(time.monotonic() - t0)
                    if r.status_code >= 300 or latencies[-1] > 2.0:
                        failures.append(f"{method} {path}: {r.status_code} in {latencies[-1]:.2f} s")
                time.sleep(0.05)
        for t in bigs:
            t.join(60)
        stalled = [status_of(s) for s in socks]
        done.set()
        sampler.join(2)

        # The pool is whole: as many reads at once as it has connections all answer.
        results: list[int] = []

        def read() -> None:
            results.append(httpx.get(f"{stack.api_url}/v1/jobs", headers=victim, timeout=10).status_code)

        readers = [threading.Thread(target=read) for _ in range(30)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(15)
        # A read session ends just after its response is sent, so a connection can be idle in
        # its transaction for a moment after the client has the answer: none may stay so.
        idle_in_tx = -1
        stop_waiting = time.monotonic() + 5
        while idle_in_tx != 0 and time.monotonic() < stop_waiting:
            with engine.connect() as conn:
                idle_in_tx = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND state LIKE 'idle in transaction%'"
                    )
                ).scalar_one()
            if idle_in_tx:
                time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
        stack.stop_all()
        engine.dispose()

    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(  # the numbers the README's limits table quotes
        f"\nABUSE: victim requests={len(latencies)} median={statistics.median(latencies) * 1000:.0f} ms "
        f"p99={p99 * 1000:.0f} ms max={ordered[-1] * 1000:.0f} ms; API RSS baseline={baseline_mb:.0f} MB "
        f"peak={peak[0]:.0f} MB; stalled uploads answered {sorted(set(map(str, stalled)))}; "
        f"big batches answered {sorted(big_status)}"
    )
    assert failures == [], failures[:10]
    assert peak[0] < RSS_GOAL_MB, f"API peaked at {peak[0]:.0f} MB"
    assert set(stalled) <= {408, 429}, stalled
    assert stalled.count(408) >= 1
    assert len(big_status) == BIG_BATCHES
    assert set(big_status) <= {413, 422, 429}, big_status
    assert results == [200] * 30, results
    assert idle_in_tx == 0
