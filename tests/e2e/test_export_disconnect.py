"""A client that goes away in the middle of ``GET /v1/batches/{id}/results`` stops the export:
the real API process (uvicorn) reads a few pages more at most, not the rest of the batch."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

JOBS = 20_000  # ~8 KB a line: 160 MB, far more than the socket buffers hold


def _seed(dsn: str) -> str:
    with psycopg.connect(dsn) as c:
        (tenant,) = c.execute("SELECT tenant_id FROM api_keys").fetchone() or ("",)
        c.execute(
            "INSERT INTO batches (id, tenant_id, total, created_at) VALUES ('bat_big', %s, %s, now())",
            (tenant, JOBS),
        )
        c.execute(
            "INSERT INTO jobs (id, tenant_id, batch_id, custom_id, request, model, stream, status,"
            " attempts, attempts_base, lease_losses, created_at, updated_at)"
            " SELECT 'job_' || lpad(i::text, 12, '0'), %s, 'bat_big', 'c' || i, '{}', 'lite', false,"
            " 'succeeded', 1, 0, 0, now(), now() FROM generate_series(1, %s) i",
            (tenant, JOBS),
        )
        c.execute(
            "INSERT INTO results (job_id, attempt_number, raw_body, content, created_at)"
            " SELECT 'job_' || lpad(i::text, 12, '0'), 1, '{}', repeat('x', 8000), now()"
            " FROM generate_series(1, %s) i",
            (JOBS,),
        )
    return "bat_big"


def _results_rows_read(dsn: str) -> int:
    """Rows of ``results`` read so far (index fetches and scans), from the statistics."""
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT coalesce(idx_tup_fetch, 0) + seq_tup_read FROM pg_stat_user_tables"
            " WHERE relname = 'results'"
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Seeded:
    """An API alone (no worker) over a PostgreSQL database holding one big succeeded batch."""

    stack: Stack
    dsn: str
    key: str
    batch_id: str


@pytest.fixture
def seeded(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Seeded]:
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    key = create_key_at(pg_url, "acme")
    batch_id = _seed(dsn)
    stack = Stack(stack_env(dsn, redis_url), tmp_path)
    try:
        stack.start_api()
        yield Seeded(stack, dsn, key, batch_id)
    finally:
        stack.stop_all()


@pytest.mark.e2e
def test_a_client_that_disconnects_mid_export_stops_the_reads(seeded: Seeded) -> None:
    stack, dsn, key, batch_id = seeded.stack, seeded.dsn, seeded.key, seeded.batch_id
    host, port = stack.api_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"GET /v1/batches/{batch_id}/results HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\n\r\n".encode()
    )
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(0.5)  # a slow reader: the API waits on the socket with no transaction open
    with psycopg.connect(dsn) as c:
        (waiting,) = c.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
        ).fetchone() or (None,)
    assert waiting == 0
    sock.close()  # gone, with ~160 MB unread

    # A backend publishes its statistics at most once a second, and an idle one 10 s after
    # its last transaction (PostgreSQL 15): wait for them, then count what was read.
    time.sleep(11.5)
    read = _results_rows_read(dsn)
    # 2,000 when written (the page being sent, the one read ahead); all 20,000 if the
    # disconnect went unseen
    assert 0 < read <= JOBS // 2, read

    # The API is fine, and a whole export still streams to the end (and reads every row).
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        with http.stream("GET", f"/v1/batches/{batch_id}/results") as resp:
            assert sum(chunk.count(b"\n") for chunk in resp.iter_raw()) == JOBS
    time.sleep(11.5)
    assert _results_rows_read(dsn) >= read + JOBS


@pytest.mark.e2e
def test_pcq_export_cut_short_by_a_dying_api_exits_1_and_leaves_no_file(
    seeded: Seeded, tmp_path: Path
) -> None:
    stack, key, batch_id = seeded.stack, seeded.key, seeded.batch_id
    out = tmp_path / "out.jsonl"
    part = tmp_path / "out.jsonl.part"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCQ_")}
    env.update(PCQ_API_URL=stack.api_url, PCQ_API_KEY=key)
    cli = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "shell.cli", "export", batch_id, "-o", str(out)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 0):  # rows are being written
        assert cli.poll() is None, cli.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stack.procs["api"].kill()
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1
    said = rf"stopped after \d+ of {JOBS} jobs \(it broke off: \w+\); no file was written"
    assert re.search(said, err), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not part.exists()
