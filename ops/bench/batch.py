"""Time one batch through the real stack: ``python ops/bench/batch.py --jobs 200``.

Starts the mock upstream, ``pcq api`` and ``pcq worker`` as processes (on a fresh PostgreSQL
database + Redis, and/or on SQLite + the embedded broker), submits one batch over HTTP,
waits for it, audits the rows and prints one line of numbers per setup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from migrations.migrate import upgrade_to_head
from pcq.tenants import create_key_at
from tests.audit import audit
from tests.stack import Stack, stack_env

MODELS = ("lite", "base", "core")


def lines(n: int) -> bytes:
    out = []
    for i in range(n):
        body = {"model": MODELS[i % 3], "messages": [{"role": "user", "content": f"bench question {i}"}]}
        out.append(json.dumps({"custom_id": f"b{i}", "body": body}))
    return ("\n".join(out) + "\n").encode()


def run_one(
    setup: str, n: int, latency_ms: int, citations: int, rate: int, pg_admin: str, redis: str
) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"pcq-bench-{setup}-"))
    dbname = None
    if setup == "postgres":
        dbname = f"pcq_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{dbname}"')
        db = pg_admin.rsplit("/", 1)[0] + f"/{dbname}"
        env = stack_env(db, redis)
    else:
        db = f"sqlite:///{work / 'pcq.sqlite3'}"
        env = stack_env(db, None)
    env["PCQ_RATE_LIMIT_PER_MINUTE"] = str(rate)
    upgrade_to_head(db.replace("postgresql://", "postgresql+psycopg://"))
    stack = Stack(env, work)
    try:
        stack.start_mock("--latency-ms", str(latency_ms), "--citations", str(citations))
        stack.start_api()
        stack.start_worker()
        key = create_key_at(db.replace("postgresql://", "postgresql+psycopg://"), "bench")
        h = {"Authorization": f"Bearer {key}"}
        body = lines(n)
        cpu_before = stack.cpu_seconds()
        t0 = time.perf_counter()
        r = httpx.post(
            f"{stack.api_url}/v1/batches",
            content=body,
            timeout=120,
            headers={**h, "Content-Type": "application/x-ndjson"},
        )
        intake = time.perf_counter() - t0
        r.raise_for_status()
        batch_id = r.json()["id"]
        while True:
            state = httpx.get(f"{stack.api_url}/v1/batches/{batch_id}", headers=h).json()
            if state["done"]:
                break
            time.sleep(0.1)
        total = time.perf_counter() - t0
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in stack.cpu_seconds().items()}
        a = audit(db.replace("postgresql://", "postgresql+psycopg://"), batch_id)
        return {
            "setup": setup,
            "jobs": n,
            "intake_s": round(intake, 3),
            "total_s": round(total, 2),
            "jobs_per_s": round(n / total, 1),
            "succeeded": state["counts"]["succeeded"],
            "results": a.results,
            "citation_rows": a.citations,
            "citations_in_raw_bodies": a.citations_in_raw,
            "attempt_rows": a.attempts,
            "upstream_calls": stack.mock_stats()["requests"],
            "cpu_ms_per_job": {k: round(v * 1000 / n, 2) for k, v in cpu.items()},
        }
    finally:
        stack.stop_all()
        if dbname:
            with psycopg.connect(pg_admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--setup", choices=["postgres", "sqlite", "both"], default="both")
    p.add_argument("--latency-ms", type=int, default=500)
    p.add_argument("--citations", type=int, default=10, help="citations per basis field")
    p.add_argument("--rate", type=int, default=100_000, help="PCQ_RATE_LIMIT_PER_MINUTE for the run")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = p.parse_args()
    setups = ["postgres", "sqlite"] if args.setup == "both" else [args.setup]
    ok = True
    for setup in setups:
        runs = [
            run_one(setup, args.jobs, args.latency_ms, args.citations, args.rate, args.pg_admin, args.redis)
            for _ in range(args.repeat)
        ]
        for r in runs:
            print(json.dumps(r))  # noqa: T201
            ok &= (
                r["succeeded"] == r["results"] == args.jobs
                and r["citation_rows"] == r["citations_in_raw_bodies"]
            )
        if args.repeat > 1:
            med = statistics.median(float(r["total_s"]) for r in runs)  # type: ignore[arg-type]
            print(f"{setup}: median {med:.2f} s for {args.jobs} jobs over {args.repeat} runs")  # noqa: T201
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
