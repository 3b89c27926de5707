"""pcq benchmarks on one machine: ``python -m ops.bench MODE`` (or ``python ops/bench/run.py MODE``).

Modes (see docs/benchmarks.md for what each measures and the results):

  throughput  pcq (API + worker + PostgreSQL + Redis) against a bare asyncio ceiling and a
              naive Celery peer, on one mock upstream (500 ms, 10 citations per field)
  inflight    how many 60-second calls one worker process holds at once, and its RSS
  limiter     PCQ_RATE_LIMIT_PER_MINUTE=600 over 3 workers against a mock enforcing 600/min
  export      GET /v1/batches/{id}/results and `pcq export` on a seeded batch of 100,000
              succeeded jobs with citations: lines/s, time, the API's peak RSS (ops/bench/export.py)
  audit       GET /v1/citations filters and /v1/batches/{id}/domains over 1,000,000 citation
              rows (100,000 jobs x 10) in PostgreSQL: p50/p99 per query (ops/bench/audit.py)
  latency     one job at a time (POST /v1/jobs, then GET every 2 ms) on an idle stack, mock
              answering at once: submit→stored and submit→seen p50/p99, and where the time
              goes, stage by stage; then the same at 50% of a 600/min quota (ops/bench/latency.py)
  fairness    600/min: tenant A's 3,000-job batch, 8 s later tenant B's one job and A's 10-job
              "high" batch: their time to done, and the quota used (ops/bench/fairness.py)

Every mode starts its own processes, uses a fresh PostgreSQL database per phase (dropped at
the end), Redis db 12 for pcq and db 11 for the naive peer, talks to 127.0.0.1 only, and
writes the full results as JSON under bench-results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from ops.bench.audit import audit, audit_table
from ops.bench.common import (
    REPO,
    flush_own_redis_db,
    fresh_database,
    git_state,
    machine,
    md_table,
    mock_stats,
    percentile,
    query,
    redis_script_calls,
    versions,
)
from ops.bench.export import export_table, run_export
from ops.bench.fairness import fairness, fairness_table
from ops.bench.latency import latency, latency_table
from ops.bench.measure import PhaseMeter, code_fingerprint, proc_status_kb, sockets_to_port, wait_quiet
from ops.bench.profile import Profiler
from ops.bench.systems import batch_body, pcq_env, run_ceiling, run_naive, run_pcq, start_pcq, wait_batch
from pcq.settings import key_id
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PCQ_REDIS = "redis://127.0.0.1:6379/12"
NAIVE_REDIS = "redis://127.0.0.1:6379/11"
DEFAULT_EXTRA = REPO / ".venv" / "bench-extras"  # optional: uvloop for the ceiling only


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)  # noqa: T201


def start_mock(workdir: Path, *args: str) -> Stack:
    mock = Stack(stack_env("sqlite:///unused.sqlite3", None), workdir)
    mock.start_mock(*args)
    return mock


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number (also inside nested dicts) over the runs."""
    first = runs[0]
    out: dict[str, Any] = {}
    for k, v in first.items():
        if isinstance(v, bool) or not isinstance(v, int | float | dict):
            out[k] = v if len(runs) == 1 else [r.get(k) for r in runs]
        elif isinstance(v, dict):
            out[k] = median_of([r.get(k) or {} for r in runs]) if v else v
        else:
            vals = [r[k] for r in runs if isinstance(r.get(k), int | float)]
            out[k] = round(statistics.median(vals), 3) if vals else None
    return out


# ------------------------------------------------------------------------- throughput


def throughput(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:
    extra = args.extra_path or (str(DEFAULT_EXTRA) if DEFAULT_EXTRA.exists() else None)
    rounds: list[dict[str, Any]] = []
    for k in range(args.repeat):
        workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-"))
        mock = start_mock(workdir, "--latency-ms", str(args.latency_ms), "--citations", str(args.citations))
        mock_pid = mock.procs["mock"].pid
        rnd: dict[str, Any] = {}
        try:
            for system in args.systems:
                say(f"[round {k + 1}/{args.repeat}] {system}: {args.jobs} jobs ...")
                profile = Profiler(outdir, f"{system}-r{k + 1}") if args.profile and k == 0 else None
                if system == "pcq":
                    rnd[system] = run_pcq(
                        args.jobs,
                        mock_url=mock.mock_url,
                        mock_pid=mock_pid,
                        pg_admin=args.pg_admin,
                        redis_url=PCQ_REDIS,
                        workers=args.workers,
                        profile=profile,
                    )
                elif system == "ceiling":
                    rnd[system] = run_ceiling(
                        args.jobs,
                        mock_url=mock.mock_url,
                        mock_pid=mock_pid,
                        pg_admin=args.pg_admin,
                        procs=2,
                        in_flight=args.ceiling_in_flight,
                        extra_path=extra,
                    )
                else:
                    rnd[system] = run_naive(
                        args.jobs,
                        mock_url=mock.mock_url,
                        mock_pid=mock_pid,
                        pg_admin=args.pg_admin,
                        redis_url=NAIVE_REDIS,
                        concurrency=args.naive_concurrency,
                        profile=profile,
                    )
                if profile:
                    rnd[system]["profile"] = profile.summaries()
                r = rnd[system]
                r["git"] = git_state()
                if r.get("code_changed_during_run"):
                    say("  WARNING: the service's sources changed during this phase")
                say(
                    f"  {r['jobs_per_s']} jobs/s, total {r['total_s']} s, p50 {r['p50_s']} s,"
                    f" cpu ms/job {r['cpu_ms_per_job']}, ok={r['ok']}"
                )
        finally:
            mock.stop_all()
        rounds.append(rnd)
    med = {s: median_of([r[s] for r in rounds]) for s in args.systems}
    ratios: dict[str, float] = {}
    if "pcq" in med:
        for peer in ("ceiling", "naive"):
            if peer in med:
                ratios[f"pcq/{peer} jobs_per_s"] = round(
                    med["pcq"]["jobs_per_s"] / med[peer]["jobs_per_s"], 3
                )
    return {"rounds": rounds, "median": med, "ratios": ratios}


def throughput_table(res: dict[str, Any]) -> str:
    med = res["median"]
    own = {"pcq": ("worker", "api"), "ceiling": ("ceiling",), "naive": ("worker",)}
    rows = [
        "| system | intake s | last call ended s | total (all visible) s | jobs/s | p50 s | p99 s"
        " | CPU ms/job: own processes | mock | postgres"
        " | redis (server) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, r in med.items():
        cpu = dict(r["cpu_ms_per_job"])
        rss = dict(r["peak_rss_mb"])
        if "workers_cpu_ms_per_job" in r:  # several pcq workers: their sum, and the largest peak RSS
            cpu["worker"] = r["workers_cpu_ms_per_job"]
            rss["worker"] = r["workers_peak_rss_mb"]
        mine = ", ".join(f"{p} {cpu.get(p, 0):.2f}" for p in own[system])
        rss_cell = ", ".join(f"{p} {rss.get(p, 0):.0f}" for p in (*own[system], "mock"))
        cells = [
            system,
            f"{r['intake_s']:.2f}",
            f"{r['last_finished_s']:.1f}",
            f"{r['total_s']:.1f}",
            f"{r['jobs_per_s']:.0f}",
            f"{r['p50_s']:.1f}",
            f"{r['p99_s']:.1f}",
            mine,
            f"{cpu.get('mock', 0):.2f}",
            f"{cpu.get('postgres', 0):.2f}",
            f"{cpu.get('redis', 0):.2f}",
            rss_cell,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows += [f"- {k}: {v:.2f}" for k, v in res["ratios"].items()]
    return "\n".join(rows)


# --------------------------------------------------------------------------- inflight


def inflight(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    n = args.jobs
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-inflight-"))
    flush_own_redis_db(PCQ_REDIS)
    mock = start_mock(workdir, "--latency-ms", str(args.latency_ms), "--citations", str(args.citations))
    port = int(mock.mock_url.rsplit(":", 1)[1])
    try:
        with fresh_database(args.pg_admin, "pcqbench_inflight", migrate=True) as db:
            env = pcq_env(
                db.url,
                PCQ_REDIS,
                mock.mock_url,
                PCQ_MAX_IN_FLIGHT=str(args.max_in_flight),
                PCQ_RATE_LIMIT_PER_MINUTE="1000000",
                PCQ_RATE_LIMIT_BURST="1000",
            )
            stack, _ = start_pcq(env, workdir, mock.mock_url, 1)
            try:
                worker = stack.procs["worker"].pid
                rss_idle = proc_status_kb(worker, "VmRSS") or 0
                key = create_key_at(db.sa_url, "bench")
                meter = PhaseMeter({"worker": worker, "mock": mock.procs["mock"].pid}, db.name, PCQ_REDIS)
                meter.start()
                t0 = time.monotonic()
                r = httpx.post(
                    f"{stack.api_url}/v1/batches",
                    content=batch_body(n),
                    timeout=600,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
                )
                r.raise_for_status()
                samples: list[dict[str, Any]] = []
                stable = 0
                plateau_at: float | None = None
                # Stop well before the first 60 s call answers (its clock starts after intake).
                deadline = t0 + min(args.latency_ms / 1000 - 8, 120)
                while time.monotonic() < deadline:
                    time.sleep(1)
                    s = {
                        "t": round(time.monotonic() - t0, 1),
                        "mock_in_flight": mock_stats(mock.mock_url)["in_flight"],
                        "worker_sockets": sockets_to_port(worker, port),
                        "db_running": query(db.url, "SELECT count(*) FROM jobs WHERE status = 'running'")[0][
                            0
                        ],
                        "worker_rss_mb": round((proc_status_kb(worker, "VmRSS") or 0) / 1024, 1),
                    }
                    samples.append(s)
                    say(f"  {s}")
                    prev = samples[-2]["mock_in_flight"] if len(samples) > 1 else -1
                    stable = stable + 1 if s["mock_in_flight"] == prev else 0
                    if plateau_at is None and (s["mock_in_flight"] >= n or stable >= 3):
                        plateau_at = s["t"]
                    if plateau_at is not None and s["t"] >= plateau_at + 5:
                        break
                m = meter.stop()
                at = [s for s in samples if plateau_at is not None and s["t"] >= plateau_at] or samples[-3:]
                stats = mock_stats(mock.mock_url)
                return {
                    "jobs": n,
                    "max_in_flight_setting": args.max_in_flight,
                    "latency_ms": args.latency_ms,
                    "plateau_reached_s": plateau_at,
                    "mock_max_in_flight": stats["max_in_flight"],
                    "mock_in_flight_at_plateau": statistics.median(s["mock_in_flight"] for s in at),
                    "worker_sockets_at_plateau": statistics.median(s["worker_sockets"] for s in at),
                    "db_running_at_plateau": statistics.median(s["db_running"] for s in at),
                    "worker_rss_mb_idle": round(rss_idle / 1024, 1),
                    "worker_rss_mb_at_plateau": max(s["worker_rss_mb"] for s in at),
                    "worker_peak_rss_mb": m["peak_rss_mb"].get("worker"),
                    "cpu_s_during_ramp": {k: round(v, 2) for k, v in m["cpu_s"].items()},
                    "samples": samples,
                }
            finally:
                stack.stop_all()
    finally:
        mock.stop_all()


def inflight_table(r: dict[str, Any]) -> str:
    head = [
        "jobs",
        "PCQ_MAX_IN_FLIGHT",
        "plateau after s",
        "mock max_in_flight",
        "mock in_flight (plateau)",
        "worker sockets to mock",
        "jobs running (DB)",
        "worker RSS MB idle → plateau",
        "worker VmHWM MB",
    ]
    cells = [
        r["jobs"],
        r["max_in_flight_setting"],
        r["plateau_reached_s"],
        r["mock_max_in_flight"],
        f"{r['mock_in_flight_at_plateau']:.0f}",
        f"{r['worker_sockets_at_plateau']:.0f}",
        f"{r['db_running_at_plateau']:.0f}",
        f"{r['worker_rss_mb_idle']:.0f} → {r['worker_rss_mb_at_plateau']:.0f}",
        f"{r['worker_peak_rss_mb']:.0f}",
    ]
    return md_table(head, [cells])


# ---------------------------------------------------------------------------- limiter


def limiter(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    n = args.jobs
    rates = [int(r) for r in args.key_rates.split(",")] if args.key_rates else [args.rate]
    keys = [f"sk-bench-key-{i + 1}-{uuid.uuid4().hex[:8]}" for i in range(len(rates))]
    # The upstream's quota per key (what the % is of): --enforce-rpm for a single key.
    quotas = [args.enforce_rpm or rates[0]] if len(rates) == 1 else rates
    limit = sum(quotas)
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-limiter-"))
    flush_own_redis_db(PCQ_REDIS)
    mock = start_mock(
        workdir,
        "--latency-ms",
        str(args.latency_ms),
        "--citations",
        str(args.citations),
        "--enforce-rpm-by-key-env",
        "PCQ_BENCH_MOCK_QUOTAS",
    )
    try:
        with fresh_database(args.pg_admin, "pcqbench_limiter", migrate=True) as db:
            overrides = {"PCQ_RATE_LIMIT_PER_MINUTE": str(rates[0]), "PARALLEL_API_KEY": keys[0]}
            if len(keys) > 1:
                extra = [
                    {"key": k, "rate_limit_per_minute": r} for k, r in zip(keys[1:], rates[1:], strict=True)
                ]
                overrides["PCQ_UPSTREAM_KEYS"] = json.dumps(extra)
            if args.burst is not None:
                overrides["PCQ_RATE_LIMIT_BURST"] = str(args.burst)
            env = pcq_env(db.url, PCQ_REDIS, mock.mock_url, **overrides)
            code = code_fingerprint(REPO)
            stack, names = start_pcq(env, workdir, mock.mock_url, args.workers)
            try:
                key = create_key_at(db.sa_url, "bench")
                h = {"Authorization": f"Bearer {key}"}
                procs = {name: stack.procs[name].pid for name in names}
                meter = PhaseMeter({**procs, "mock": mock.procs["mock"].pid}, db.name, PCQ_REDIS)
                quiet = wait_quiet()
                scripts0 = redis_script_calls(PCQ_REDIS)
                meter.start()
                r = httpx.post(
                    f"{stack.api_url}/v1/batches",
                    content=batch_body(n),
                    timeout=600,
                    headers={**h, "Content-Type": "application/x-ndjson"},
                )
                r.raise_for_status()
                batch_id = r.json()["id"]
                state = wait_batch(stack.api_url, h, batch_id, stall_s=60.0, every=2.0)
                m = meter.stop()
                m["limiter_script_calls"] = redis_script_calls(PCQ_REDIS) - scripts0
                stats = mock_stats(mock.mock_url)
                rows = query(db.url, "SELECT started_at, status_code, upstream_key_id FROM attempts")
            finally:
                stack.stop_all()
    finally:
        mock.stop_all()
    starts = sorted(row[0].timestamp() for row in rows)
    oks = sorted(row[0].timestamp() for row in rows if row[1] == 200)
    limited = sorted(row[0].timestamp() for row in rows if row[1] == 429)
    out = limiter_numbers(n, limit, args.warmup, starts, oks, stats, m, state)
    if len(keys) > 1:
        out["per_key"] = []
        for k, quota in zip(keys, quotas, strict=True):
            mine = sorted(row[0].timestamp() for row in rows if row[2] == key_id(k))
            if not mine:
                out["per_key"].append({"quota_per_minute": quota, "calls": 0})
                continue
            numbers = limiter_numbers(len(mine), quota, args.warmup, mine, [], stats, m, state)
            out["per_key"].append(
                {
                    "quota_per_minute": quota,
                    "calls": len(mine),
                    "steady_rate_per_min": numbers["steady_rate_per_min"],
                    "steady_pct_of_limit": numbers["steady_pct_of_limit"],
                    "max_calls_any_60s": numbers["max_calls_any_60s"],
                    "mock_429": stats["by_key"].get(mock_digest(k), {}).get("rate_limited", 0),
                }
            )
    out["busy_cores_before"] = quiet
    out["code"] = code
    out["code_changed_during_run"] = code_fingerprint(REPO) != code
    out["burst"] = args.burst
    out["pcq_rate_limit_per_minute"] = rates
    out["calls_429_at_s"] = [round(t - starts[0], 2) for t in limited]
    return out


def mock_digest(key: str) -> str:
    """How the mock names a key in /mock/stats (blake2b, 8 bytes)."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def limiter_numbers(
    n: int,
    limit: int,
    warmup: float,
    starts: list[float],
    oks: list[float],
    stats: dict[str, Any],
    meter: dict[str, Any],
    state: dict[str, Any],
) -> dict[str, Any]:
    """Steady-state rate from attempts.started_at (the worker's clock when each call began).

    Window: from ``warmup`` seconds after the first call to the last call; every call in
    between was admitted by the limiter while jobs were still waiting (the backlog lasts
    until the last call starts). rate = calls started in (a, b] / (b - a) * 60.
    """
    a, b = starts[0] + warmup, starts[-1]
    in_window = sum(1 for t in starts if a < t <= b)
    rate = in_window / (b - a) * 60 if b > a else float("nan")
    ok_rate = sum(1 for t in oks if a < t <= b) / (b - a) * 60 if b > a else float("nan")
    # The most calls in any 60 s window (what a sliding-window enforcer sees).
    j, worst = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - 60:
            j += 1
        worst = max(worst, i - j + 1)
    first_minute = sum(1 for t in starts if t < starts[0] + 60)
    gaps = [y - x for x, y in zip(starts, starts[1:], strict=False) if a < x <= b]
    return {
        "jobs": n,
        "limit_per_minute": limit,
        "calls": len(starts),
        "succeeded": state["counts"].get("succeeded", 0),
        "failed": state["counts"].get("failed", 0),
        "run_s": round(starts[-1] - starts[0], 1),
        "window_s": round(b - a, 1),
        "steady_rate_per_min": round(rate, 1),
        "steady_pct_of_limit": round(100 * rate / limit, 1),
        "steady_200_rate_per_min": round(ok_rate, 1),
        "calls_first_60s": first_minute,
        "max_calls_any_60s": worst,
        "gap_p50_ms": round(1000 * percentile(gaps, 50), 1),
        "gap_p99_ms": round(1000 * percentile(gaps, 99), 1),
        "mock_429": stats["by_status"].get("429", 0),
        "rate_limited_by_enforcer": stats["rate_limited_by_enforcer"],
        "mock_requests": stats["requests"],
        # Server-wide count, so it includes any other client's scripts during the run.
        "limiter_script_calls_per_job": round(meter.get("limiter_script_calls", 0) / n, 1),
        "cpu_ms_per_job": {k: round(v * 1000 / n, 2) for k, v in meter["cpu_s"].items()},
        "peak_rss_mb": meter["peak_rss_mb"],
    }


def limiter_table(r: dict[str, Any]) -> str:
    cpu = r["cpu_ms_per_job"]
    workers = ", ".join(f"{v:.1f}" for k, v in cpu.items() if k.startswith("worker"))
    head = [
        "jobs",
        "limit/min",
        "calls",
        "steady window s",
        "steady rate /min",
        "% of limit",
        "max calls in any 60 s",
        "429 (mock by_status)",
        "rate_limited_by_enforcer",
        "worker CPU ms/job",
        "redis CPU ms/job",
        "limiter scripts/job",
    ]
    cells = [
        r["jobs"],
        r["limit_per_minute"],
        r["calls"],
        r["window_s"],
        r["steady_rate_per_min"],
        r["steady_pct_of_limit"],
        r["max_calls_any_60s"],
        r["mock_429"],
        r["rate_limited_by_enforcer"],
        workers,
        f"{cpu.get('redis', 0):.1f}",
        r.get("limiter_script_calls_per_job", "?"),
    ]
    table = md_table(head, [cells])
    if r.get("per_key"):
        rows = [
            [
                i + 1,
                k["quota_per_minute"],
                k["calls"],
                k.get("steady_rate_per_min", "-"),
                k.get("steady_pct_of_limit", "-"),
                k.get("max_calls_any_60s", "-"),
                k.get("mock_429", "-"),
            ]
            for i, k in enumerate(r["per_key"])
        ]
        head = ["key", "quota/min", "calls", "steady rate /min", "% of quota", "max calls in any 60 s", "429"]
        table += "\n\n" + md_table(head, rows)
    return table


# ------------------------------------------------------------------------------ export


def export(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    args.redis_url = PCQ_REDIS
    return run_export(args)


# ------------------------------------------------------------------------------- main

MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "throughput": {"jobs": 10_000, "latency_ms": 500, "workers": 1},
    "inflight": {"jobs": 2_500, "latency_ms": 60_000, "workers": 1},
    "limiter": {"jobs": 1_600, "latency_ms": 200, "workers": 3},
    "export": {"jobs": 100_000, "citations": 3},
    "audit": {"jobs": 100_000},
    "latency": {"jobs": 25, "latency_ms": 0, "workers": 1},
    "fairness": {"jobs": 3_000, "latency_ms": 100, "workers": 1},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ops.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=sorted(MODE_DEFAULTS))
    p.add_argument(
        "--jobs",
        type=int,
        help="jobs per run (throughput 10000, inflight 2500, limiter 1600, export 100000, audit 100000;"
        " latency: timed jobs, 25; fairness: tenant A's backlog, 3000)",
    )
    p.add_argument("--repeat", type=int, default=1, help="throughput, export: runs to take the median of")
    p.add_argument(
        "--latency-ms",
        type=int,
        help="mock latency (throughput 500, inflight 60000, limiter 200, latency 0, fairness 100)",
    )
    p.add_argument(
        "--citations",
        type=int,
        help="mock citations per basis field (10; export 3); audit: citations per job (10)",
    )
    p.add_argument("--fields", type=int, default=4, help="export: basis fields per answer")
    p.add_argument("--samples", type=int, default=100, help="audit: timed runs of each query")
    p.add_argument("--workers", type=int, help="pcq worker processes (throughput 1, limiter 3)")
    p.add_argument(
        "--systems",
        default="pcq,ceiling,naive",
        help="throughput: which systems to run, comma-separated (pcq, ceiling, naive)",
    )
    p.add_argument("--ceiling-in-flight", type=int, default=1000, help="calls in flight per ceiling process")
    p.add_argument("--naive-concurrency", type=int, default=100, help="threads of the naive Celery worker")
    p.add_argument("--profile", action="store_true", help="py-spy the worker processes in the first round")
    p.add_argument("--max-in-flight", type=int, default=2500, help="inflight: PCQ_MAX_IN_FLIGHT")
    p.add_argument(
        "--rate",
        type=int,
        default=600,
        help="limiter, fairness, latency's loaded phase: PCQ_RATE_LIMIT_PER_MINUTE",
    )
    p.add_argument(
        "--enforce-rpm", type=int, help="limiter: the mock's --enforce-rpm (default: the same as --rate)"
    )
    p.add_argument("--burst", type=int, help="limiter: PCQ_RATE_LIMIT_BURST (default: pcq's default)")
    p.add_argument(
        "--key-rates",
        help="limiter: several upstream keys, one quota each (e.g. 600,1200): pcq's per-key "
        "limits and the mock's per-key enforcement",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="limiter, fairness: seconds excluded at the start of the rate",
    )
    p.add_argument(
        "--extra-path", help="PYTHONPATH entry for the ceiling (default .venv/bench-extras if present)"
    )
    p.add_argument("--poll-ms", type=float, default=2.0, help="latency: GET /v1/jobs/{id} every this long")
    p.add_argument(
        "--gap", type=float, default=0.5, help="latency: seconds between one job's end and the next"
    )
    p.add_argument("--warmup-jobs", type=int, default=2, help="latency: untimed jobs first, per phase")
    p.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="latency: another tenant's jobs as a fraction of --rate in the second phase (0: idle only)",
    )
    p.add_argument("--settle", type=float, default=5.0, help="latency: seconds of load before the probes")
    p.add_argument("--jitter-ms", type=int, default=50, help="fairness: mock latency jitter (±)")
    p.add_argument("--delay", type=float, default=8.0, help="fairness: seconds from A's batch to B's job")
    p.add_argument("--urgent", type=int, default=10, help="fairness: jobs in A's high-priority batch")
    p.add_argument(
        "--no-priority", action="store_true", help="fairness: send no priority field (a base without it)"
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=400.0,
        help="fairness: stop waiting for B's job and the urgent batch this long after they were sent",
    )
    p.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="fairness: seconds the backlog keeps running once both are done (quota use), then stop",
    )
    p.add_argument("--pg-admin", default=PG_ADMIN)
    p.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = p.parse_args(argv)
    for k, v in MODE_DEFAULTS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.citations is None:
        args.citations = 10
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - {"pcq", "ceiling", "naive"}:
        p.error(f"unknown system(s): {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    modes = {
        "throughput": throughput,
        "inflight": inflight,
        "limiter": limiter,
        "export": export,
        "audit": audit,
        "latency": latency,
        "fairness": fairness,
    }
    res = modes[args.mode](args, args.out)
    tables = {"throughput": throughput_table, "inflight": inflight_table, "limiter": limiter_table}
    table = {
        **tables,
        "export": export_table,
        "audit": audit_table,
        "latency": latency_table,
        "fairness": fairness_table,
    }[args.mode](res)
    record = {
        "mode": args.mode,
        "command": "python -m ops.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "duration_s": round(time.time() - started, 1),
        "result": res,
    }
    path = args.out / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(table)  # noqa: T201
    print(f"\nfull results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")  # noqa: T201
    ok = all(r.get("ok", True) for rnd in res.get("rounds", []) for r in rnd.values())
    return 0 if ok else 1


def _exit_on_sigterm() -> None:
    """SIGTERM (or ``timeout``) unwinds like an error: every phase stops what it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


if __name__ == "__main__":
    _exit_on_sigterm()
    sys.exit(main())
