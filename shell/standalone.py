"""``pcq standalone``: API + worker (+ a mock upstream when no key is set) as one process tree.

Embedded defaults: the database is an SQLite file in the working directory and, unless
``REDIS_URL`` is set, the Celery broker is kombu's SQLAlchemy transport on another SQLite
file. That broker was chosen over an in-memory one because the API and the worker are
separate processes that must share the queue, and over a bundled Redis because it needs no
server at all; messages survive a restart, and the limiter's state lives in the worker.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Any

from migrations.migrate import upgrade_to_head
from pcq.models import JobStatus
from pcq.settings import Settings
from pcq.tenants import create_key_at
from shell.client import PcqClient
from shell.procs import free_port, spawn, stop, wait_http
from shell.watch import watch_batch


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201


def run_standalone(settings: Settings, *, port: int, demo: bool) -> int:
    upgrade_to_head(settings.database_url)
    env = dict(os.environ)
    logdir = Path(tempfile.mkdtemp(prefix="pcq-standalone-"))
    procs = []
    try:
        if settings.parallel_api_key is None:
            mock_port = free_port()
            mock = spawn(
                ["mock-upstream", "--port", str(mock_port), "--latency-ms", "300"],
                env,
                logdir / "mock.log",
            )
            procs.append(mock)
            env["PARALLEL_BASE_URL"] = f"http://127.0.0.1:{mock_port}"
            env["PARALLEL_API_KEY"] = "mock-key"
            wait_http(f"http://127.0.0.1:{mock_port}/healthz", proc=mock)
            upstream = f"the mock upstream on 127.0.0.1:{mock_port} (set PARALLEL_API_KEY for the real one)"
        else:
            upstream = settings.parallel_base_url
        worker = spawn(["worker"], env, logdir / "worker.log")
        api = spawn(["api", "--host", "127.0.0.1", "--port", str(port)], env, logdir / "api.log")
        procs += [worker, api]
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", proc=api)
        key = create_key_at(
            settings.database_url, "demo" if demo else "standalone", settings.key_pepper.get_secret_value()
        )
        _say(f"pcq is running: API {base} (docs at {base}/docs), upstream: {upstream}")
        _say(f"broker: {settings.effective_broker_url.split('://')[0]}, database: {settings.database_url}")
        _say(f"logs in {logdir}")
        if demo:
            return _demo(base, key)
        _say(f"an API key for tenant 'standalone' (shown once):\n{key}")
        _say("press Ctrl-C to stop")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            stop(p)


def _demo(base: str, key: str) -> int:
    client = PcqClient(base, key)
    try:
        sample = resources.files("shell").joinpath("samples/demo.jsonl").read_bytes()
        batch = client.submit_batch_jsonl(sample)
        _say(f"\nsubmitted batch {batch['id']} with {batch['total']} jobs; waiting for answers...")
        state = watch_batch(client, batch["id"])
        for line in client.results(batch["id"]):
            if line:
                _print_job(client, line)
        counts = state["counts"]
        _say(f"\nbatch {batch['id']}: " + ", ".join(f"{k}={v}" for k, v in counts.items() if v))
        return 0 if counts[JobStatus.SUCCEEDED] == batch["total"] else 1
    finally:
        client.close()


def _print_job(client: PcqClient, line: str) -> None:
    import json

    row: dict[str, Any] = json.loads(line)
    _say(f"\n== {row['custom_id']} ({row['job_id']}): {row['status']}")
    result = row.get("result")
    if not result:
        _say(f"   error: {row.get('error')}")
        return
    _say(textwrap.indent(textwrap.shorten(result["content"] or "", 300), "   answer: "))
    usage = result.get("usage")
    if usage:
        _say(f"   usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens")
    cites = client.citations(job_id=row["job_id"])
    _say(f"   citations ({len(cites)} rows in the database):")
    for c in cites:
        _say(
            f"     [{c['field']}#{c['position']}] {c['url']}  ({c['confidence'] or 'n/a'}) {c['title'] or ''}"
        )


if __name__ == "__main__":
    sys.exit("use `pcq standalone`")
