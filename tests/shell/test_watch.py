"""``pcq watch`` and ``pcq submit --wait``, run as a user runs them (subprocesses, no terminal)
against a running stack (PostgreSQL + Redis, real API, worker and mock upstream)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pcq.tenants import create_key_at
from shell.procs import spawn, wait_http
from tests.stack import Stack, stack_env

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def running(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A stack, and the environment of a client of one tenant."""
    s = Stack(stack_env(pg_url, redis_url), tmp_path)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        yield s, {"PCQ_API_URL": s.api_url, "PCQ_API_KEY": create_key_at(pg_url, "watcher")}
    finally:
        s.stop_all()


def pcq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shell.cli", *args]


def client_env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PCQ_") and k != "DATABASE_URL"}
    return {**base, **extra}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        pcq_command(*args),
        env=client_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def jsonl(latencies_ms: list[int], fail: tuple[int, ...] = ()) -> str:
    lines = []
    for i, ms in enumerate(latencies_ms):
        directive = "[[mock:status=400]]" if i in fail else f"[[mock:latency_ms={ms}]]"
        content = f"q{i} {uuid.uuid4().hex} {directive}"
        body = {"model": "lite", "messages": [{"role": "user", "content": content}]}
        lines.append(json.dumps({"custom_id": f"c{i}", "body": body}))
    return "\n".join(lines) + "\n"


def submit(s: Stack, env: dict[str, str], body: str) -> str:
    r = httpx.post(
        f"{s.api_url}/v1/batches",
        content=body,
        headers={"Authorization": f"Bearer {env['PCQ_API_KEY']}", "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 202, r.text
    batch_id: str = r.json()["id"]
    return batch_id


def test_watch_shows_plain_progress_then_the_summary_and_exits_1_when_a_job_failed(
    running: tuple[Stack, dict[str, str]],
) -> None:
    s, env = running
    batch_id = submit(s, env, jsonl([0, 1500, 3000], fail=(0,)))
    out = run(env, "watch", batch_id)
    assert out.returncode == 1, out.stderr
    assert out.stdout.strip() == f"batch {batch_id} completed: succeeded 2, failed 1 (of 3)"
    lines = out.stderr.splitlines()
    assert "\r" not in out.stderr  # no terminal: plain lines, not a redrawn bar
    assert lines[-1].startswith(f"{batch_id}: 3/3 ended (100%), 1 failed, 0 cancelled, 0 running, ")
    assert "jobs/s, ETA 0s" in lines[-1]
    assert all(line.startswith(f"{batch_id}: ") for line in lines)


def test_watch_exits_0_when_every_job_succeeded_and_2_for_a_batch_it_cannot_see(
    running: tuple[Stack, dict[str, str]],
) -> None:
    s, env = running
    batch_id = submit(s, env, jsonl([0, 500]))
    out = run(env, "watch", batch_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"batch {batch_id} completed: succeeded 2 (of 2)"
    # Watching a completed batch again is one event, the same summary.
    again = run(env, "watch", batch_id)
    assert (again.returncode, again.stdout) == (0, out.stdout)

    missing = run(env, "watch", "bat_nope")
    assert missing.returncode == 2
    assert "cannot watch batch bat_nope" in missing.stderr
    assert "404" in missing.stderr
    wrong_key = run({**env, "PCQ_API_KEY": "pcq_nope_nope"}, "watch", batch_id)
    assert wrong_key.returncode == 2
    assert "401" in wrong_key.stderr


def test_submit_wait_follows_the_batch_to_its_end(
    running: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    _, env = running
    f = tmp_path / "batch.jsonl"
    f.write_text(jsonl([0, 1000, 2000], fail=(2,)))
    out = run(env, "submit", str(f), "--wait")
    assert out.returncode == 1, out.stderr  # a job failed
    batch_id = out.stdout.strip().splitlines()[-1]
    assert f"batch {batch_id} completed: succeeded 2, failed 1 (of 3)" in out.stderr
    assert f"{batch_id}: 3/3 ended (100%), 1 failed" in out.stderr


def test_watch_reconnects_when_the_api_goes_away_and_comes_back(
    running: tuple[Stack, dict[str, str]],
) -> None:
    """The API is stopped mid-watch and started again on its port: the watch reconnects (with
    Last-Event-ID) and still ends with the summary."""
    s, env = running
    batch_id = submit(s, env, jsonl([0, 4000, 8000]))
    watcher = subprocess.Popen(  # noqa: S603
        pcq_command("watch", batch_id),
        env=client_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # the watch has its first events
        stopping = time.monotonic()
        s.procs["api"].terminate()
        s.procs["api"].wait(15)
        # The open stream did not hold the shutdown until the batch's end (8 s away): it ended
        # at its next poll.
        assert time.monotonic() - stopping < 4
        time.sleep(2)  # a few failed reconnects
        port = s.api_url.rsplit(":", 1)[1]
        s.procs["api-again"] = spawn(["api", "--port", port], s.env, s.log("api-again"), cwd=s.workdir)
        wait_http(f"{s.api_url}/healthz", proc=s.procs["api-again"])
        stdout, stderr = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr + s.logs()
    assert stdout.strip() == f"batch {batch_id} completed: succeeded 3 (of 3)"
    # It came back to the new API (whose lines are JSON: stderr is not a terminal).
    access = [json.loads(line)["msg"] for line in s.log("api-again").read_text().splitlines()]
    assert any('events HTTP/1.1" 200' in msg for msg in access)
