"""One quota, shared: ``python -m ops.bench fairness`` (issue 12, part 4).

At ``PCQ_RATE_LIMIT_PER_MINUTE=--rate`` (600), against a mock that answers in
``--latency-ms`` ± ``--jitter-ms`` (100 ± 50 ms) and enforces the same quota per sliding
minute, tenant A submits a ``--jobs`` (3,000) job batch; ``--delay`` (8) seconds later tenant
B submits one job (``POST /v1/jobs``) and tenant A a ``--urgent`` (10) job batch with
``"priority": "high"`` (left out with ``--no-priority``, for a base whose API has no such
field). The client polls both every 0.1 s.

Reported: for B's job and for A's urgent batch (all of it), the time from its submission to
done, as the client saw it and by the stored ``jobs.finished_at`` (when the last call ended);
``--give-up-after`` (400 s) after their submission the run stops waiting (first come, first
served takes ~300 s). Then it goes on for ``--window`` (60) seconds, or until A's backlog is
done, and stops everything; the rest of the backlog is dropped with the database.

**Quota used while the backlog lasts**: calls started (``attempts.started_at``) from
``--warmup`` (10) s after the first call to the end of the run (or the last call, if the
backlog ran out first), per minute, against ``worker.limiter.window_safe`` of the quota (what
the limiter allows itself: 589 of 600 with the default burst). The mock's own count (sampled
every second) over the same span is reported beside it, and so is the same rate over the
window after B and the urgent batch were done.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ops.bench.common import REPO, flush_own_redis_db, fresh_database, md_table, mock_stats, query
from ops.bench.measure import code_fingerprint, wait_quiet
from ops.bench.systems import batch_body, pcq_env, start_pcq
from ops.bench.tables import request_for
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env
from worker.limiter import window_safe

PCQ_REDIS = "redis://127.0.0.1:6379/12"
BURST = 5  # pcq's default PCQ_RATE_LIMIT_BURST, which the run leaves as it is


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)  # noqa: T201


class MockSampler(threading.Thread):
    """(epoch s, requests, 429s) of the mock, every second: the calls the upstream saw."""

    def __init__(self, mock_url: str) -> None:
        super().__init__(name="bench-mock-sampler", daemon=True)
        self.mock_url = mock_url
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                s = mock_stats(self.mock_url)
                self.samples.append((time.time(), int(s["requests"]), int(s["by_status"].get("429", 0))))
            except httpx.HTTPError:
                pass
            if self.halt.wait(1.0):
                return

    def rate(self, a: float, b: float) -> float | None:
        """Requests per second the mock saw between the samples nearest to ``a`` and ``b``."""
        inside = [s for s in self.samples if a <= s[0] <= b]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def urgent_body(n: int, priority: bool) -> bytes:
    requests = [{"custom_id": f"urgent-{i}", "body": request_for(i)} for i in range(n)]
    body: dict[str, Any] = {"requests": requests}
    if priority:
        body["priority"] = "high"
    return json.dumps(body).encode()


def calls_rate(starts: list[float], a: float, b: float) -> float | None:
    """Calls started in (a, b], per minute."""
    if b <= a:
        return None
    return sum(1 for t in starts if a < t <= b) / (b - a) * 60


def max_in_any_60s(starts: list[float]) -> int:
    j, worst = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - 60:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


def fairness(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    workdir = Path(tempfile.mkdtemp(prefix="pcq-bench-fairness-"))
    flush_own_redis_db(PCQ_REDIS)
    code = code_fingerprint(REPO)
    mock = Stack(stack_env("sqlite:///unused.sqlite3", None), workdir)
    mock.start_mock(
        "--latency-ms",
        str(args.latency_ms),
        "--latency-jitter-ms",
        str(args.jitter_ms),
        "--citations",
        str(args.citations),
        "--enforce-rpm",
        str(args.rate),
    )
    try:
        with fresh_database(args.pg_admin, "pcqbench_fairness", migrate=True) as db:
            env = pcq_env(db.url, PCQ_REDIS, mock.mock_url, PCQ_RATE_LIMIT_PER_MINUTE=str(args.rate))
            stack, _ = start_pcq(env, workdir, mock.mock_url, args.workers)
            say(f"  logs: {workdir}")
            try:
                out = drive(args, stack, mock.mock_url, db.sa_url)
                rows = query(
                    db.url,
                    "SELECT j.id, j.tenant_id, j.batch_id, a.started_at, a.status_code FROM attempts a"
                    " JOIN jobs j ON j.id = a.job_id",
                )
                finished = {
                    r[0]: r[1].timestamp()
                    for r in query(
                        db.url,
                        "SELECT id, finished_at FROM jobs WHERE finished_at IS NOT NULL"
                        " AND (id = %s OR batch_id = %s)",
                        out["b"]["job_id"],
                        out["urgent"]["batch_id"],
                    )
                }
            finally:
                stack.stop_all()
    finally:
        mock.stop_all()
    return numbers(args, out, rows, finished, code)


def drive(args: argparse.Namespace, stack: Stack, mock_url: str, sa_url: str) -> dict[str, Any]:
    """Submit the backlog, then B's job and A's urgent batch; wait for them, then the window."""
    key_a, key_b = create_key_at(sa_url, "tenant-a"), create_key_at(sa_url, "tenant-b")
    a = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key_a}"}, timeout=600)
    b = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key_b}"}, timeout=60)
    sampler = MockSampler(mock_url)
    quiet = wait_quiet()
    sampler.start()
    try:
        say(f"  tenant A: a {args.jobs}-job batch")
        t_backlog = time.time()
        r = a.post(
            "/v1/batches", content=batch_body(args.jobs), headers={"Content-Type": "application/x-ndjson"}
        )
        r.raise_for_status()
        backlog_id = r.json()["id"]
        backlog_answered = time.time()
        time.sleep(max(0.0, t_backlog + args.delay - time.time()))
        say("  tenant B: one job; tenant A: the urgent batch")
        t_b = time.time()
        r = b.post("/v1/jobs", json={"request": request_for(args.jobs + 1), "custom_id": "b-single"})
        r.raise_for_status()
        job_b = r.json()["id"]
        t_u = time.time()
        r = a.post(
            "/v1/batches",
            content=urgent_body(args.urgent, not args.no_priority),
            headers={"Content-Type": "application/json"},
        )
        r.raise_for_status()
        urgent_id = r.json()["id"]
        seen_b: float | None = None
        seen_u: float | None = None
        give_up = t_b + args.give_up_after
        next_note = time.time() + 30
        while (seen_b is None or seen_u is None) and time.time() < give_up:
            now = time.time()
            if seen_b is None and b.get(f"/v1/jobs/{job_b}").json()["status"] == "succeeded":
                seen_b = now
                say(f"  B's job done after {now - t_b:.1f} s")
            if seen_u is None and a.get(f"/v1/batches/{urgent_id}").json()["done"]:
                seen_u = now
                say(f"  A's urgent batch done after {now - t_u:.1f} s")
            if now > next_note:
                say(f"  ... {now - t_b:.0f} s since B's job")
                next_note = now + 30
            time.sleep(0.1)
        targets_done = time.time()
        say(f"  quota window: up to {args.window:.0f} s more, while A's backlog lasts")
        backlog_done = False
        while time.time() < targets_done + args.window:
            if a.get(f"/v1/batches/{backlog_id}").json()["done"]:
                backlog_done = True
                break
            time.sleep(1.0)
        stopped = time.time()
        backlog = a.get(f"/v1/batches/{backlog_id}").json()
    finally:
        sampler.halt.set()
        sampler.join()
        a.close()
        b.close()
    return {
        "busy_cores_before": quiet,
        "backlog": {
            "batch_id": backlog_id,
            "submitted": t_backlog,
            "intake_s": round(backlog_answered - t_backlog, 2),
            "done_at_stop": backlog_done,
            "counts_at_stop": backlog["counts"],
        },
        "b": {"job_id": job_b, "submitted": t_b, "seen": seen_b},
        "urgent": {"batch_id": urgent_id, "submitted": t_u, "seen": seen_u},
        "targets_done": targets_done,
        "stopped": stopped,
        "mock_samples": sampler.samples,
        "sampler": sampler,
    }


def numbers(
    args: argparse.Namespace,
    out: dict[str, Any],
    rows: list[tuple[Any, ...]],
    finished: dict[str, float],
    code: str,
) -> dict[str, Any]:
    sampler: MockSampler = out.pop("sampler")
    starts = sorted(r[3].timestamp() for r in rows)
    b, u = out["b"], out["urgent"]
    urgent_ids = [r[0] for r in rows if r[2] == u["batch_id"]]
    u_finished = [finished[i] for i in set(urgent_ids) if i in finished]
    b_finished = finished.get(b["job_id"])

    def after(t: float | None, t0: float) -> float | None:
        return None if t is None else round(t - t0, 2)

    safe_per_min, _ = window_safe(args.rate, BURST)
    first = starts[0] if starts else out["backlog"]["submitted"]
    a0 = first + args.warmup
    # The backlog lasts until its last call starts: past that, no job was waiting for the quota.
    end = out["stopped"] if not out["backlog"]["done_at_stop"] else max(starts)
    rate = calls_rate(starts, a0, end)
    mock_rate = sampler.rate(a0, end)
    after_rate = calls_rate(starts, out["targets_done"], end)
    after_mock = sampler.rate(out["targets_done"], end)
    samples = out.pop("mock_samples")
    return {
        "rate_limit_per_minute": args.rate,
        "window_safe_per_minute": safe_per_min,
        "priority_field": not args.no_priority,
        "backlog_jobs": args.jobs,
        "urgent_jobs": args.urgent,
        "delay_s": args.delay,
        "give_up_after_s": args.give_up_after,
        "mock_latency_ms": f"{args.latency_ms} ± {args.jitter_ms}",
        "workers": args.workers,
        "b_submit_to_seen_s": after(b["seen"], b["submitted"]),
        "b_submit_to_finished_s": after(b_finished, b["submitted"]),
        "urgent_submit_to_seen_s": after(u["seen"], u["submitted"]),
        "urgent_submit_to_finished_s": (
            after(max(u_finished), u["submitted"]) if len(u_finished) == args.urgent else None
        ),
        "urgent_done": len(u_finished),
        "quota": {
            "span_s": [
                round(a0 - out["backlog"]["submitted"], 1),
                round(end - out["backlog"]["submitted"], 1),
            ],
            "calls_per_min": None if rate is None else round(rate, 1),
            "pct_of_window_safe": None if rate is None else round(100 * rate / safe_per_min, 1),
            "pct_of_quota": None if rate is None else round(100 * rate / args.rate, 1),
            "mock_calls_per_s": None if mock_rate is None else round(mock_rate, 2),
            "mock_pct_of_window_safe": (
                None if mock_rate is None else round(100 * mock_rate * 60 / safe_per_min, 1)
            ),
            "after_targets_calls_per_min": None if after_rate is None else round(after_rate, 1),
            "after_targets_mock_calls_per_s": None if after_mock is None else round(after_mock, 2),
            "max_calls_any_60s": max_in_any_60s(starts),
            "calls": len(starts),
            "mock_429": samples[-1][2] if samples else None,
            "attempts_429": sum(1 for r in rows if r[4] == 429),
        },
        "run": {k: v for k, v in out.items() if k not in ("b", "urgent")},
        "b": b,
        "urgent": u,
        "mock_samples": [[round(t - out["backlog"]["submitted"], 2), n, e] for t, n, e in samples],
        "code": code,
        "code_changed_during_run": code_fingerprint(REPO) != code,
    }


def fairness_table(r: dict[str, Any]) -> str:
    q = r["quota"]

    def secs(v: float | None, limit: float) -> str:
        return f"> {limit:.0f} (gave up)" if v is None else f"{v:.1f}"

    head = [
        "priority field",
        "B's job: submit → done s (seen / finished_at)",
        f"A's {r['urgent_jobs']} urgent: submit → all done s (seen / finished_at)",
        "quota used while the backlog lasts: calls/min (mock calls/s)",
        "% of window-safe",
        "after both done: calls/min",
        "max calls in any 60 s",
        "429s",
    ]
    limit = r["give_up_after_s"]
    cells = [
        "high" if r["priority_field"] else "none (--no-priority)",
        f"{secs(r['b_submit_to_seen_s'], limit)} / {secs(r['b_submit_to_finished_s'], limit)}",
        f"{secs(r['urgent_submit_to_seen_s'], limit)} / {secs(r['urgent_submit_to_finished_s'], limit)}",
        f"{q['calls_per_min']} ({q['mock_calls_per_s']})",
        f"{q['pct_of_window_safe']}% of {r['window_safe_per_minute']}",
        "— (backlog over)" if q["after_targets_calls_per_min"] is None else q["after_targets_calls_per_min"],
        q["max_calls_any_60s"],
        q["mock_429"],
    ]
    return md_table(head, [cells])
