"""One job at a time: ``python -m ops.bench latency`` (issue 12, part 5).

An idle stack as a new user runs it: one ``pcq worker``, the API, PostgreSQL, Redis, and the
mock upstream answering at once (``--latency-ms 0``), at the shipped quota (300/min). A
client submits one job at a time with ``POST /v1/jobs`` and polls ``GET /v1/jobs/{id}``
every ``--poll-ms`` (2 ms) until it reads ``succeeded``; it waits ``--gap`` seconds between
jobs (``--warmup-jobs`` untimed ones first). Then the same on a new stack at
``PCQ_RATE_LIMIT_PER_MINUTE=--rate`` (600) with another tenant's jobs, one ``POST /v1/jobs``
each, evenly spaced, so that they and the probes arrive at ``--load`` (50%) of that rate;
the load runs ``--settle`` (5) seconds before the first probe.

**When a result is stored.** Neither stored timestamp is the commit: the writer stamps
``jobs.finished_at`` and ``results.created_at`` with the attempt's ``finished_at`` (the
worker's clock when the call ended, before the outcome waits in the writer's queue). So the
benchmark adds, in its own throw-away database only, deferred constraint triggers that note
``clock_timestamp()`` at the commit of each transaction that inserts a job, moves its status
or inserts its result (``bench_commits``). They fire as the commit begins, after every
statement of the transaction; the WAL flush that follows is not in them (the client's
``GET`` bounds it from above). PostgreSQL and the client read the same machine's clock.

**Stages** of each job, from those commits and the stored timestamps (ms, from the POST):
POST sent → job row committed (API) → POST answered (the enqueue) and → claim began
(``jobs.started_at``: broker, Celery, engine hand-off, the admission check) → claim
committed → call started (``attempts.started_at``: the limiter) → call finished → result
committed (the writer's queue, ``WRITE_LINGER``, the transaction) → seen by the client.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg

from ops.bench.common import (
    REPO,
    Database,
    flush_own_redis_db,
    fresh_database,
    md_table,
    mock_stats,
    percentile,
    query,
)
from ops.bench.measure import PhaseMeter, code_fingerprint, wait_quiet
from ops.bench.systems import pcq_env, start_pcq
from ops.bench.tables import request_for
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

PCQ_REDIS = "redis://127.0.0.1:6379/12"

# Bench-only instrumentation, created in the phase's own database after the migrations.
COMMIT_PROBES = """
CREATE TABLE bench_commits (job_id text NOT NULL, what text NOT NULL, at timestamptz NOT NULL);
CREATE INDEX ON bench_commits (job_id);
CREATE FUNCTION bench_commit_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO bench_commits
  VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN 'inserted' ELSE NEW.status::text END, clock_timestamp());
  RETURN NULL;
END $$;
CREATE FUNCTION bench_commit_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO bench_commits VALUES (NEW.job_id, 'stored', clock_timestamp());
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_job_inserted AFTER INSERT ON jobs
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_commit_job();
CREATE CONSTRAINT TRIGGER bench_job_status AFTER UPDATE ON jobs
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION bench_commit_job();
CREATE CONSTRAINT TRIGGER bench_result_stored AFTER INSERT ON results
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_commit_result();
"""

# (name, from, to): each stage of a job, in ms, between two of its moments (see probe_moments).
STAGES = (
    ("POST sent → job row committed", "post", "inserted"),
    ("row committed → POST answered", "inserted", "answered"),
    ("row committed → claim began", "inserted", "claim_began"),
    ("claim began → claim committed", "claim_began", "claimed"),
    ("claim committed → call started", "claimed", "call_started"),
    ("call started → call finished", "call_started", "call_finished"),
    ("call finished → result committed", "call_finished", "stored"),
    ("result committed → seen by GET", "stored", "seen"),
)


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)  # noqa: T201


def install_commit_probes(db: Database) -> None:
    with psycopg.connect(db.url, autocommit=True) as c:
        c.execute(COMMIT_PROBES)  # several statements: no parameters, so psycopg sends them as one


def job_body(i: int, tag: str) -> dict[str, Any]:
    request = request_for(i)
    request["messages"][0]["content"] += f" ({tag})"
    return {"request": request, "custom_id": f"{tag}-{i}"}


class Load(threading.Thread):
    """Another tenant's jobs, one ``POST /v1/jobs`` each, so that they and the probes together
    arrive at ``per_s``, evenly spaced: the load sends the jobs the probes (``probes_sent``,
    counted by the prober) leave of that rate, on an absolute schedule, so a slow answer does
    not lower it."""

    def __init__(self, api_url: str, key: str, per_s: float) -> None:
        super().__init__(name="bench-load", daemon=True)
        self.api_url, self.key, self.per_s = api_url, key, per_s
        self.halt = threading.Event()
        self.sent = 0
        self.probes_sent = 0
        self.errors = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.api_url, headers=headers, timeout=30) as client:
            t0 = time.monotonic()
            while not self.halt.is_set():
                due = t0 + (self.sent + self.probes_sent) / self.per_s
                if time.monotonic() < due:
                    self.halt.wait(min(due - time.monotonic(), 0.05))
                    continue
                try:
                    client.post("/v1/jobs", json=job_body(self.sent, "load")).raise_for_status()
                except httpx.HTTPError:
                    self.errors += 1
                self.sent += 1


def probe(client: httpx.Client, i: int, poll_s: float, timeout_s: float = 60.0) -> dict[str, Any]:
    """Submit one job, poll it until it reads succeeded; the client's moments (epoch s)."""
    body = job_body(i, "probe")
    post = time.time()
    r = client.post("/v1/jobs", json=body)
    answered = time.time()
    r.raise_for_status()
    job_id: str = r.json()["id"]
    polls = 0
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.get(f"/v1/jobs/{job_id}").json()
        polls += 1
        if state["status"] == "succeeded":
            seen = time.time()
            break
        if state["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"probe job {job_id} ended {state['status']!r} (see the worker's log)")
        if poll_s > 0:
            time.sleep(poll_s)
    return {"job_id": job_id, "post": post, "answered": answered, "seen": seen, "polls": polls}


def probe_moments(db: Database, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each probe's moments: the client's and the database's, as ms after its POST was sent."""
    ids = [p["job_id"] for p in probes]
    commits: dict[tuple[str, str], float] = {}
    for job_id, what, at in query(
        db.url, "SELECT job_id, what, min(at) FROM bench_commits WHERE job_id = ANY(%s) GROUP BY 1, 2", ids
    ):
        commits[(job_id, what)] = at.timestamp()
    stored: dict[str, tuple[float, float, float]] = {}
    for job_id, claim_began, call_started, call_finished in query(
        db.url,
        "SELECT j.id, j.started_at, a.started_at, a.finished_at FROM jobs j"
        " JOIN attempts a ON a.job_id = j.id AND a.number = 1 WHERE j.id = ANY(%s)",
        ids,
    ):
        stored[job_id] = (claim_began.timestamp(), call_started.timestamp(), call_finished.timestamp())
    out = []
    for p in probes:
        j = p["job_id"]
        at = {
            "post": p["post"],
            "answered": p["answered"],
            "seen": p["seen"],
            "inserted": commits.get((j, "inserted")),
            "claimed": commits.get((j, "running")),
            "stored": commits.get((j, "stored")),
        }
        if j in stored:
            at["claim_began"], at["call_started"], at["call_finished"] = stored[j]
        out.append(
            {
                "job_id": j,
                "post_at": round(p["post"], 6),
                "polls": p["polls"],
                **{k: None if v is None else round((v - p["post"]) * 1000, 2) for k, v in at.items()},
            }
        )
    return out


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "min": None, "max": None, "mean": None}
    return {
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "mean": round(statistics.fmean(values), 1),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stored = [r["stored"] for r in rows if r["stored"] is not None]
    seen = [r["seen"] for r in rows]
    stages = {}
    for name, a, b in STAGES:
        vals = [r[b] - r[a] for r in rows if r.get(a) is not None and r.get(b) is not None]
        stages[name] = spread(vals)
    return {
        "jobs": len(rows),
        "submit_to_stored_ms": spread(stored),
        "submit_to_seen_ms": spread(seen),
        "stages_ms": stages,
    }


@contextlib.contextmanager
def pcq_stack(
    args: argparse.Namespace, name: str, mock_args: list[str], **overrides: str
) -> Iterator[tuple[Stack, Stack, Database]]:
    """Mock + a fresh database with the commit probes + API and one worker; all stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pcq-bench-{name}-"))
    flush_own_redis_db(PCQ_REDIS)
    mock = Stack(stack_env("sqlite:///unused.sqlite3", None), workdir)
    mock.start_mock(*mock_args)
    try:
        with fresh_database(args.pg_admin, f"pcqbench_{name}", migrate=True) as db:
            install_commit_probes(db)
            env = pcq_env(db.url, PCQ_REDIS, mock.mock_url, **overrides)
            stack, _ = start_pcq(env, workdir, mock.mock_url, args.workers)
            try:
                say(f"  logs: {workdir}")
                yield stack, mock, db
            finally:
                stack.stop_all()
    finally:
        mock.stop_all()


def run_probes(
    api_url: str, key: str, n: int, warmup: int, poll_s: float, gap_s: float, load: Load | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``warmup`` probes (kept apart), then ``n``; one at a time, ``gap_s`` between them."""
    done: list[dict[str, Any]] = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for i in range(warmup + n):
            if load is not None:
                load.probes_sent += 1  # the load leaves this job's share of the rate to the probe
            done.append(probe(client, i, poll_s))
            time.sleep(gap_s)
    return done[:warmup], done[warmup:]


def phase(args: argparse.Namespace, name: str, load_fraction: float, **overrides: str) -> dict[str, Any]:
    say(f"[{name}] ...")
    mock_args = ["--latency-ms", str(args.latency_ms), "--citations", str(args.citations)]
    with pcq_stack(args, name, mock_args, **overrides) as (stack, mock, db):
        probe_key = create_key_at(db.sa_url, "probe")
        procs = {n: p.pid for n, p in stack.procs.items()}
        # "bench": this process, the client (its polling and the load thread).
        meter = PhaseMeter(
            {**procs, "mock": mock.procs["mock"].pid, "bench": os.getpid()}, db.name, PCQ_REDIS
        )
        quiet = wait_quiet()
        load: Load | None = None
        rate = int(overrides.get("PCQ_RATE_LIMIT_PER_MINUTE", "300"))
        if load_fraction > 0:
            load = Load(stack.api_url, create_key_at(db.sa_url, "load"), load_fraction * rate / 60)
            load.start()
            time.sleep(args.settle)  # the load reaches its steady state first
        calls0 = mock_stats(mock.mock_url)["requests"]
        meter.start()
        t0 = time.time()
        warm, probes = run_probes(
            stack.api_url, probe_key, args.jobs, args.warmup_jobs, args.poll_ms / 1000, args.gap, load
        )
        t1 = time.time()
        m = meter.stop()
        calls = mock_stats(mock.mock_url)["requests"] - calls0
        if load is not None:
            load.halt.set()
            load.join()
        rows = probe_moments(db, probes)
        out = summarise(rows)
        jobs_done = query(
            db.url,
            "SELECT count(*) FROM attempts WHERE finished_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
            t0,
            t1,
        )[0][0]
        out.update(
            {
                "phase": name,
                "rate_limit_per_minute": rate,
                "load_fraction": load_fraction,
                "load_jobs_sent": load.sent if load else 0,
                "load_errors": load.errors if load else 0,
                "mock_calls_per_s_during_probes": round(calls / (t1 - t0), 2),
                "quota_used_during_probes": round(calls / (t1 - t0) * 60 / rate, 3),
                "jobs_finished_during_probes": jobs_done,
                "cpu_ms_per_job": {k: round(v * 1000 / max(jobs_done, 1), 2) for k, v in m["cpu_s"].items()},
                "busy_cores_before": quiet,
                "warmup": probe_moments(db, warm),
                "probes": rows,
            }
        )
        return out


def latency(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    code = code_fingerprint(REPO)
    # The shipped quota (300/min) when idle: what a new user runs.
    phases = [phase(args, "latency_idle", 0.0)]
    if args.load > 0:
        phases.append(phase(args, "latency_load", args.load, PCQ_RATE_LIMIT_PER_MINUTE=str(args.rate)))
    return {
        "phases": phases,
        "poll_ms": args.poll_ms,
        "gap_s": args.gap,
        "mock_latency_ms": args.latency_ms,
        "code": code,
        "code_changed_during_run": code_fingerprint(REPO) != code,
    }


def latency_table(res: dict[str, Any]) -> str:
    head = [
        "phase",
        "quota/min",
        "load",
        "jobs",
        "submit→stored p50 / p99 / min / max ms",
        f"submit→seen (GET every {res['poll_ms']} ms) p50 / p99 / min / max ms",
        "quota used during the probes (mock calls/s)",
    ]
    rows = []
    for p in res["phases"]:
        s, v = p["submit_to_stored_ms"], p["submit_to_seen_ms"]
        rows.append(
            [
                p["phase"].removeprefix("latency_"),
                p["rate_limit_per_minute"],
                f"{p['load_fraction']:.0%}",
                p["jobs"],
                f"{s['p50']} / {s['p99']} / {s['min']} / {s['max']}",
                f"{v['p50']} / {v['p99']} / {v['min']} / {v['max']}",
                f"{p['quota_used_during_probes']:.0%} ({p['mock_calls_per_s_during_probes']})",
            ]
        )
    lines = [md_table(head, rows), ""]
    names = [p["phase"].removeprefix("latency_") for p in res["phases"]]
    head = ["stage (ms)", *(f"{n} p50 / p99" for n in names)]
    stage_rows = [
        [stage, *(f"{p['stages_ms'][stage]['p50']} / {p['stages_ms'][stage]['p99']}" for p in res["phases"])]
        for stage, _, _ in STAGES
    ]
    lines.append(md_table(head, stage_rows))
    return "\n".join(lines)
