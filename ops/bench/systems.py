"""One benchmark phase per system: pcq, the ceiling and the naive peer, on a running mock.

Each phase gets a fresh PostgreSQL database, runs ``n`` jobs (the same requests for all
three), and returns the same set of numbers: intake time, end-to-end jobs/s, p50/p99 job
latency, CPU seconds per process (PhaseMeter), peak RSS per process, and a row check.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from ops.bench.common import (
    REPO,
    flush_own_redis_db,
    fresh_database,
    mock_reset,
    mock_stats,
    percentile,
    query,
    spawn_python,
    timing_rows,
    wait_for_log,
)
from ops.bench.measure import PhaseMeter, code_fingerprint, wait_quiet
from ops.bench.profile import Profiler
from ops.bench.tables import request_for
from pcq.tenants import create_key_at
from tests.audit import audit
from tests.stack import Stack, stack_env

# stack_env's test-friendly values, put back to the shipped defaults for a benchmark.
PRODUCTION_DEFAULTS = ("PCQ_SWEEP_INTERVAL_SECONDS", "PCQ_RETRY_BASE_SECONDS", "PCQ_RETRY_MAX_SECONDS")


def pcq_env(database_url: str, redis_url: str, mock_url: str, **overrides: str) -> dict[str, str]:
    env = stack_env(database_url, redis_url)
    for k in PRODUCTION_DEFAULTS:
        env.pop(k, None)
    env["PCQ_QUEUE_NAME"] = f"pcq-bench-{uuid.uuid4().hex[:8]}"
    env["PARALLEL_BASE_URL"] = mock_url
    env.update(overrides)
    return env


def batch_body(n: int) -> bytes:
    lines = (json.dumps({"custom_id": f"b{i}", "body": request_for(i)}) for i in range(n))
    return ("\n".join(lines) + "\n").encode()


def start_pcq(env: dict[str, str], workdir: Path, mock_url: str, workers: int = 1) -> tuple[Stack, list[str]]:
    """API + ``workers`` worker processes on a running mock; returns once all are ready."""
    stack = Stack(env, workdir, mock_url=mock_url)
    stack.start_api()
    names = ["worker"] if workers == 1 else [f"worker-{k + 1}" for k in range(workers)]
    for name in names:
        stack.start_worker(name)
    for name in names:
        # Celery logs "<name> ready." once it consumes; the engine (and sweeper) start then too.
        wait_for_log(stack.log(name), " ready.", stack.procs[name])
    return stack, names


class Progress:
    """Fails a wait that makes no progress for ``stall_s`` seconds (every run stays bounded)."""

    def __init__(self, what: str, stall_s: float = 60.0) -> None:
        self.what = what
        self.stall_s = stall_s
        self.last = -1
        self.since = time.monotonic()

    def check(self, done: int) -> None:
        if done != self.last:
            self.last, self.since = done, time.monotonic()
        elif time.monotonic() - self.since > self.stall_s:
            raise TimeoutError(f"{self.what}: no progress for {self.stall_s:.0f} s at {done} done")


def wait_batch(
    api_url: str, headers: dict[str, str], batch_id: str, stall_s: float = 60.0, every: float = 0.5
) -> dict[str, Any]:
    """Poll the batch until done; fail if no job finishes for ``stall_s`` seconds."""
    progress = Progress(f"batch {batch_id}", stall_s)
    while True:
        state: dict[str, Any] = httpx.get(
            f"{api_url}/v1/batches/{batch_id}", headers=headers, timeout=30
        ).json()
        if state["done"]:
            return state
        counts = state["counts"]
        progress.check(sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled")))
        time.sleep(every)


POLL_S = 0.2  # how often a run checks whether every job is done (the error bar of done_s)


def summary(
    n: int, t0: float, intake: float, lat: list[float], last: float, done: float, meter: dict[str, Any]
) -> dict[str, Any]:
    """``done``: when the driver saw every job done (results committed and visible);
    ``last``: the latest ``finished_at`` (pcq and the naive peer stamp it when the call ended,
    before the rows are committed). jobs/s is n over the time to ``done``."""
    total = done - t0
    cpu: dict[str, float] = meter["cpu_s"]
    return {
        "jobs": n,
        "intake_s": round(intake, 3),
        "total_s": round(total, 2),
        "jobs_per_s": round(n / total, 1),
        "last_finished_s": round(last - t0, 2),
        "p50_s": round(percentile(lat, 50), 2),
        "p99_s": round(percentile(lat, 99), 2),
        "cpu_ms_per_job": {k: round(v * 1000 / n, 3) for k, v in cpu.items()},
        "peak_rss_mb": meter["peak_rss_mb"],
        "machine_busy_s": round(meter["machine_busy_s"], 2),
        "wall_s": round(meter["wall_s"], 2),
        "pg_backends_seen": meter["pg_backends_seen"],
    }


def run_pcq(
    n: int,
    *,
    mock_url: str,
    mock_pid: int,
    pg_admin: str,
    redis_url: str,
    workers: int = 1,
    profile: Profiler | None = None,
) -> dict[str, Any]:
    flush_own_redis_db(redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-pcq-"))
    with fresh_database(pg_admin, "pcqbench_pcq", migrate=True) as db:
        env = pcq_env(db.url, redis_url, mock_url, PCQ_RATE_LIMIT_PER_MINUTE="10000000")
        code = code_fingerprint(REPO)  # the code the processes below import
        stack, names = start_pcq(env, workdir, mock_url, workers)
        try:
            key = create_key_at(db.sa_url, "bench")
            headers = {"Authorization": f"Bearer {key}"}
            body = batch_body(n)
            mock_reset(mock_url)
            procs = {name: stack.procs[name].pid for name in ["api", *names]}
            meter = PhaseMeter({**procs, "mock": mock_pid, "bench": os.getpid()}, db.name, redis_url)
            quiet = wait_quiet()
            meter.start()
            if profile:
                profile.start({k: v for k, v in procs.items()})
            t0 = time.time()
            r = httpx.post(
                f"{stack.api_url}/v1/batches",
                content=body,
                timeout=600,
                headers={**headers, "Content-Type": "application/x-ndjson"},
            )
            intake = time.time() - t0
            r.raise_for_status()
            batch_id = r.json()["id"]
            state = wait_batch(stack.api_url, headers, batch_id, every=POLL_S)
            done = time.time()
            m = meter.stop()
            if profile:
                profile.stop()
            lat, _, last = timing_rows(
                db.url, "SELECT created_at, finished_at FROM jobs WHERE batch_id = %s", batch_id
            )
            a = audit(db.sa_url, batch_id)
            out = summary(n, t0, intake, lat, last, done, m)
            out["busy_cores_before"] = quiet
            out["code"] = code
            out["code_changed_during_run"] = code_fingerprint(REPO) != code
            if workers > 1:  # kept apart from cpu_ms_per_job, whose entries add up to the machine
                out["workers_cpu_ms_per_job"] = round(
                    sum(v for k, v in out["cpu_ms_per_job"].items() if k.startswith("worker-")), 3
                )
                out["workers_peak_rss_mb"] = max(
                    v for k, v in m["peak_rss_mb"].items() if k.startswith("worker-")
                )
            out["check"] = {
                "succeeded": state["counts"].get("succeeded", 0),
                "results": a.results,
                "citation_rows": a.citations,
                "citations_in_raw": a.citations_in_raw,
                "attempt_rows": a.attempts,
                "duplicate_results": a.duplicate_results,
            }
            out["ok"] = a.results == n and a.citations == a.citations_in_raw == 10 * n
            out["mock"] = mock_stats(mock_url)
            return out
        finally:
            stack.stop_all()


def run_ceiling(
    n: int,
    *,
    mock_url: str,
    mock_pid: int,
    pg_admin: str,
    procs: int = 2,
    in_flight: int = 1000,
    extra_path: str | None = None,
) -> dict[str, Any]:
    from sqlalchemy import create_engine, func, select

    from ops.bench.tables import bench_tables

    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-ceiling-"))
    with fresh_database(pg_admin, "pcqbench_ceil", migrate=False) as db:
        md, results, citations = bench_tables("ceil")
        engine = create_engine(db.sa_url)
        md.create_all(engine)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO), env.get("PYTHONPATH")) if p)
        share = [n // procs + (1 if k < n % procs else 0) for k in range(procs)]
        starts = [sum(share[:k]) for k in range(procs)]
        children = [
            spawn_python(
                [
                    "-m",
                    "ops.bench.ceiling",
                    "--url",
                    mock_url,
                    "--db",
                    db.sa_url,
                    "--start",
                    str(starts[k]),
                    "--count",
                    str(share[k]),
                    "--in-flight",
                    str(in_flight),
                    "--report",
                    str(workdir / f"ceiling-{k}.json"),
                ],
                env,
                None,
                stdin=subprocess.PIPE,
            )
            for k in range(procs)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                line = child.stdout.readline().decode().strip()
                if line != "ready":
                    raise RuntimeError(f"ceiling process did not start: {line!r}")
            mock_reset(mock_url)
            meter = PhaseMeter({"mock": mock_pid, "bench": os.getpid()}, db.name, None)
            quiet = wait_quiet()
            meter.start()
            t0 = time.time()
            for child in children:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                child.stdin.flush()
            reports = []
            deadline = time.monotonic() + max(300.0, n / 10)
            for k, child in enumerate(children):
                child.communicate(timeout=max(1.0, deadline - time.monotonic()))
                reports.append(json.loads((workdir / f"ceiling-{k}.json").read_text()))
            m = meter.stop(extra_cpu={"ceiling": sum(r["cpu_s"] for r in reports)})
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        done = [t for r in reports for t in r["done_at"]]
        lat = [t - t0 for t in done]
        m["peak_rss_mb"]["ceiling"] = max(r["peak_rss_mb"] for r in reports)
        out = summary(n, t0, 0.0, lat, max(done), max(done), m)
        out["busy_cores_before"] = quiet
        with engine.connect() as c:
            n_results = c.scalar(select(func.count()).select_from(results)) or 0
            n_cites = c.scalar(select(func.count()).select_from(citations)) or 0
        engine.dispose()
        out["check"] = {
            "results": n_results,
            "citation_rows": n_cites,
            "errors": sum(r["errors"] for r in reports),
        }
        out["ok"] = n_results == n and n_cites == 10 * n
        out["loop"] = reports[0]["loop"]
        out["processes"] = procs
        out["peak_rss_mb_each"] = [r["peak_rss_mb"] for r in reports]
        out["mock"] = mock_stats(mock_url)
        return out


def run_naive(
    n: int,
    *,
    mock_url: str,
    mock_pid: int,
    pg_admin: str,
    redis_url: str,
    concurrency: int = 100,
    profile: Profiler | None = None,
) -> dict[str, Any]:
    flush_own_redis_db(redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-naive-"))
    # Read once, when ops.bench.naive is first imported: one queue per benchmark process (the
    # Redis db is flushed before every run, so rounds do not share messages).
    os.environ.setdefault("NAIVE_BROKER_URL", redis_url)
    os.environ.setdefault("NAIVE_QUEUE", f"naive-bench-{uuid.uuid4().hex[:8]}")
    from ops.bench import naive

    queue = naive.QUEUE
    if os.environ["NAIVE_BROKER_URL"] != redis_url:
        raise ValueError("the naive peer's broker is fixed per process")

    with fresh_database(pg_admin, "pcqbench_naive", migrate=False) as db:
        naive.create_tables(db.sa_url)
        env = dict(os.environ)
        env.update(NAIVE_DATABASE_URL=db.sa_url, NAIVE_UPSTREAM_URL=mock_url)
        log = workdir / "naive-worker.log"
        worker = spawn_python(
            [
                "-m",
                "celery",
                "-A",
                "ops.bench.naive",
                "worker",
                "--pool",
                "threads",
                "-c",
                str(concurrency),
                "-Q",
                queue,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            env,
            log,
        )
        from shell.procs import stop

        try:
            wait_for_log(log, "naive worker ready", worker)
            jobs = [(f"n{i}", request_for(i)) for i in range(n)]
            mock_reset(mock_url)
            meter = PhaseMeter(
                {"worker": worker.pid, "mock": mock_pid, "bench": os.getpid()}, db.name, redis_url
            )
            quiet = wait_quiet()
            meter.start()
            if profile:
                profile.start({"naive-worker": worker.pid})
            t0 = time.time()
            naive.submit(db.sa_url, jobs)
            intake = time.time() - t0
            progress = Progress(f"naive peer (see {log})")
            while True:
                done = query(db.url, "SELECT count(*) FROM naive_jobs WHERE status <> 'queued'")[0][0]
                if done >= n:
                    done_at = time.time()
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"naive worker exited; see {log}")
                progress.check(done)
                time.sleep(POLL_S)
            m = meter.stop()
            if profile:
                profile.stop()
            lat, _, last = timing_rows(db.url, "SELECT created_at, finished_at FROM naive_jobs")
            out = summary(n, t0, intake, lat, last, done_at, m)
            out["busy_cores_before"] = quiet
            n_results = query(db.url, "SELECT count(*) FROM naive_results")[0][0]
            n_cites = query(db.url, "SELECT count(*) FROM naive_citations")[0][0]
            n_ok = query(db.url, "SELECT count(*) FROM naive_jobs WHERE status = 'succeeded'")[0][0]
            out["check"] = {"succeeded": n_ok, "results": n_results, "citation_rows": n_cites}
            out["ok"] = n_ok == n_results == n and n_cites == 10 * n
            out["concurrency"] = concurrency
            out["mock"] = mock_stats(mock_url)
            return out
        finally:
            stop(worker)
