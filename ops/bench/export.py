"""How fast a batch's results stream out: ``python -m ops.bench export``.

Seeds, in a fresh PostgreSQL database, one batch of ``--jobs`` (100,000) succeeded jobs whose
answers look like the mock upstream's (a ``json_schema`` answer of ``--fields`` fields, each
with a basis entry of ``--citations`` citations: 4 x 3 by default, so 12 citation rows per
job), written with COPY as the worker writes them. Then starts a real API process (``pcq api``)
and, ``--repeat`` times:

- streams ``GET /v1/batches/{id}/results`` with httpx, counting lines and bytes, while a thread
  samples the API process's RSS (``VmRSS`` of ``/proc/<pid>/status``, every 20 ms): lines/s,
  total time, time to the first byte, bytes, the RSS before and the peak during the stream;
- runs ``pcq export BATCH --format csv --citations FILE -o FILE`` as a process, end to end
  (its own interpreter start included), and counts the rows it wrote.

Before each stream it waits (up to 60 s) for the machine to be nearly idle, as the other
modes do, and records the busy cores it saw (``busy_cores_before``).

Medians over the repeats go in the table. Everything it starts is stopped and the database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from ops.bench.common import REPO, Database, fresh_database
from ops.bench.measure import proc_status_kb, wait_quiet
from pcq.db import make_engine, make_session_factory
from pcq.jobs.lifecycle import AnswerRows, ClaimedJob
from pcq.models import JobStatus
from pcq.models.base import new_id
from pcq.repositories.bulk import copy_rows
from pcq.repositories.results import insert_answers
from pcq.tenants import create_key_at
from pcq.wire import parse_completion
from tests.stack import Stack, stack_env

FIELDS = ("company", "founded", "headquarters", "employees", "funding", "ceo")
SAMPLES = 64  # distinct answers, reused round-robin (each with its own topic)
SEED_CHUNK = 2_000  # jobs per COPY transaction


def sample_bodies(fields: int, citations: int) -> list[str]:
    """Answers as the mock upstream writes them for a ``json_schema`` request of ``fields`` fields."""
    from mock_upstream.server import MockConfig, _completion, _Directives, _State

    st = _State(config=MockConfig(citations_per_field=citations), rng=random.Random(1))
    schema = {"type": "object", "properties": {f: {"type": "string"} for f in FIELDS[:fields]}}
    out = []
    for i in range(SAMPLES):
        topic = f"bench company {i} and its history"
        payload = {
            "model": "core",
            "messages": [{"role": "user", "content": topic}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "facts", "schema": schema}},
        }
        out.append(json.dumps(_completion(st, payload, topic, _Directives())))
    return out


def seed(db: Database, jobs: int, fields: int, citations: int) -> tuple[str, str]:
    """One tenant, one batch of ``jobs`` succeeded jobs with their answers: (API key, batch id)."""
    key = create_key_at(db.sa_url, "bench-export")
    engine = make_engine(db.sa_url, pool_size=1, max_overflow=0)
    sessions = make_session_factory(engine)
    parsed = [parse_completion(b, None) for b in sample_bodies(fields, citations)]
    now = datetime.now(UTC)
    request = json.dumps({"model": "core", "messages": [{"role": "user", "content": "bench company"}]})
    try:
        with sessions.begin() as s:
            tenant = s.execute(text("SELECT tenant_id FROM api_keys LIMIT 1")).scalar_one()
            batch_id = new_id("bat")
            batch = [[batch_id, tenant, jobs, now]]
            copy_rows(s, "batches", ["id", "tenant_id", "total", "created_at"], batch, set())
        job_cols = ["id", "tenant_id", "batch_id", "custom_id", "request", "model", "stream", "status"]
        job_cols += ["attempts", "created_at", "updated_at", "started_at", "finished_at"]
        for start in range(0, jobs, SEED_CHUNK):
            ids = [new_id("job") for _ in range(min(SEED_CHUNK, jobs - start))]
            rows = [
                [i, tenant, batch_id, f"row-{start + n}", request, "core", False, JobStatus.SUCCEEDED.value]
                + [1, now, now, now, now]
                for n, i in enumerate(ids)
            ]
            answers = AnswerRows()
            for n, job_id in enumerate(ids):
                answers.add(ClaimedJob(job_id, tenant, batch_id, 1, ""), parsed[(start + n) % SAMPLES], now)
            with sessions.begin() as s:
                copy_rows(s, "jobs", job_cols, rows, set())
                insert_answers(
                    s,
                    results=answers.results,
                    usage=answers.usage,
                    basis=answers.basis,
                    citations=answers.citations,
                )
        with engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    return key, batch_id


class RssSampler:
    """The peak ``VmRSS`` of one process, sampled every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every = pid, every
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS") or 0)
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_once(api_url: str, key: str, batch_id: str, api_pid: int) -> dict[str, Any]:
    """One ``GET /v1/batches/{id}/results``, read as fast as the client can."""
    before = proc_status_kb(api_pid, "VmRSS") or 0
    lines = size = 0
    first = None
    with (
        httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http,
        RssSampler(api_pid) as rss,
    ):
        t0 = time.perf_counter()
        with http.stream("GET", f"/v1/batches/{batch_id}/results") as resp:
            resp.raise_for_status()
            for chunk in resp.iter_raw():
                if first is None:
                    first = time.perf_counter() - t0
                lines += chunk.count(b"\n")
                size += len(chunk)
        took = time.perf_counter() - t0
    return {
        "lines": lines,
        "seconds": round(took, 3),
        "lines_per_s": round(lines / took),
        "first_byte_s": round(first or 0.0, 3),
        "mb": round(size / 1e6, 1),
        "api_rss_before_mb": round(before / 1024, 1),
        "api_rss_peak_mb": round(rss.peak_kb / 1024, 1),
    }


def cli_export_once(api_url: str, key: str, batch_id: str, workdir: Path) -> dict[str, Any]:
    """``pcq export BATCH --format csv --citations FILE -o FILE`` as a user runs it, timed whole."""
    out, cites = workdir / "export.csv", workdir / "citations.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCQ_")}
    env.update(PCQ_API_URL=api_url, PCQ_API_KEY=key, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "shell.cli", "export", batch_id, "--format", "csv"]
    cmd += ["--citations", str(cites), "-o", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, check=False)  # noqa: S603  (our interpreter)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"pcq export failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    with out.open(newline="", encoding="utf-8") as f:
        rows = sum(1 for _ in csv.DictReader(f))
    with cites.open(newline="", encoding="utf-8") as f:
        cite_rows = sum(1 for _ in csv.DictReader(f))
    return {
        "seconds": round(took, 3),
        "rows_per_s": round(rows / took),
        "rows": rows,
        "citation_rows": cite_rows,
        "mb": round((out.stat().st_size + cites.stat().st_size) / 1e6, 1),
    }


def median_by_key(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark itself (``python -m ops.bench export``); the result ``run.py`` records."""
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-export-"))
    with fresh_database(args.pg_admin, "pcqbench_export", migrate=True) as db:
        t0 = time.perf_counter()
        key, batch_id = seed(db, args.jobs, args.fields, args.citations)
        seeded = time.perf_counter() - t0
        print(f"seeded {args.jobs} jobs in {seeded:.1f} s", file=sys.stderr, flush=True)  # noqa: T201
        # This checkout's code, whatever the interpreter has installed (the API runs in workdir).
        stack = Stack({**stack_env(db.url, args.redis_url), "PYTHONPATH": str(REPO)}, workdir)
        try:
            stack.start_api()
            api_pid = stack.procs["api"].pid
            streams, exports = [], []
            for k in range(args.repeat):
                # Other work on the machine slows both sides of the stream: wait for a quiet
                # moment (up to 60 s), and record how busy it was.
                busy = wait_quiet(max_wait_s=60)
                stream = stream_once(stack.api_url, key, batch_id, api_pid)
                streams.append({**stream, "busy_cores_before": busy})
                print(f"[{k + 1}/{args.repeat}] stream: {streams[-1]}", file=sys.stderr, flush=True)  # noqa: T201
                exports.append(cli_export_once(stack.api_url, key, batch_id, workdir))
                print(f"[{k + 1}/{args.repeat}] pcq export: {exports[-1]}", file=sys.stderr, flush=True)  # noqa: T201
        finally:
            stack.stop_all()
    return {
        "jobs": args.jobs,
        "fields": args.fields,
        "citations_per_field": args.citations,
        "seed_seconds": round(seeded, 1),
        "stream": median_by_key(streams),
        "pcq_export_csv": median_by_key(exports),
        "rounds": [{"stream": s, "pcq_export_csv": e} for s, e in zip(streams, exports, strict=True)],
    }


def export_table(res: dict[str, Any]) -> str:
    s, e = res["stream"], res["pcq_export_csv"]
    return "\n".join(
        [
            f"{res['jobs']} succeeded jobs, {res['fields']} basis fields x {res['citations_per_field']} "
            f"citations each (medians of {len(res['rounds'])})",
            "",
            "| what | lines/s | seconds | first byte s | MB | API RSS before -> peak (MB) | busy cores |",
            "|---|---|---|---|---|---|---|",
            f"| GET /v1/batches/{{id}}/results | {s['lines_per_s']:,.0f} | {s['seconds']} | "
            f"{s['first_byte_s']} | {s['mb']} | {s['api_rss_before_mb']} -> {s['api_rss_peak_mb']} | "
            f"{s['busy_cores_before']} |",
            f"| pcq export --format csv --citations | {e['rows_per_s']:,.0f} | {e['seconds']} | - | "
            f"{e['mb']} | - | - |",
        ]
    )
