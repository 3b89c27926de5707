"""Peak memory of the API under concurrent maximum-size uploads: ``python -m ops.bench.uploads``.

For each kind of batch body (JSONL, JSON) this starts ``pcq api`` as a real process on a fresh
PostgreSQL database (Redis db 12 as the broker, flushed afterwards; no worker, so the jobs stay
queued), sends ``--uploads`` concurrent uploads of ``PCQ_MAX_BATCH_BYTES`` each (the same body,
from as many tenants as ``PCQ_MAX_UPLOADS_PER_TENANT`` needs to admit them all), waits for every
answer, and reports the API process's peak resident set: VmHWM of ``/proc/PID/status`` (the
kernel's own high-water mark), with VmRSS sampled every 50 ms beside it. One API process per
phase, so each peak is that phase's own. Meanwhile another tenant reads ``GET /v1/jobs`` and
submits a job, in turn, every 50 ms; its latency is reported too.

    python -m ops.bench.uploads                     # 8 x 64 MiB of each kind, 1 MiB requests
    python -m ops.bench.uploads --line-kib 4        # the same bytes as many small requests
    python -m ops.bench.uploads --batch-mib 256     # the shipped PCQ_MAX_BATCH_BYTES (1-3 min on 2 cores)
    python -m ops.bench.uploads --reject-last       # every batch refused at its last request (422)
    python -m ops.bench.uploads --code /tmp/pcq-old # the API from another checkout (before/after)

Every request is as large as a request may be (``--line-kib``, default just under
``PCQ_MAX_REQUEST_BYTES``): one message of up to 200,000 characters after another, in
non-ASCII text so that it stays under the 1,000,000 characters a request may hold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from ops.bench.common import REPO, flush_own_redis_db, fresh_database, git_state, machine, query, versions
from ops.bench.measure import proc_status_kb
from pcq.tenants import create_key_at
from tests.stack import Stack, stack_env

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/12"
MIB = 1024 * 1024
WORDS = "forêt où naïve été "  # 19 characters, 23 bytes of UTF-8
PER_TENANT = 4  # PCQ_MAX_UPLOADS_PER_TENANT's default


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)  # noqa: T201


def request_of(target_bytes: int, i: int) -> dict[str, Any]:
    """A chat request of about ``target_bytes`` of JSON (as json.dumps writes it, non-ASCII kept)."""
    room = max(0, target_bytes - 200)  # the rest of the line
    per_char = len(WORDS.encode()) / len(WORDS)
    chars = min(int(room / per_char), 950_000)
    messages = []
    while chars > 0:
        n = min(chars, 200_000)
        text = f"{i} " + WORDS * (n // len(WORDS) + 1)
        messages.append({"role": "user", "content": text[:n]})
        chars -= n
    return {"model": "lite", "messages": messages or [{"role": "user", "content": str(i)}]}


def bodies(batch_bytes: int, line_bytes: int, reject_last: bool) -> dict[str, bytes]:
    """A JSONL and a JSON body of at most ``batch_bytes`` each, of requests of ``line_bytes``."""
    lines: list[str] = []
    size = 0
    margin = 64  # the JSON body's own "{"requests": [...]}" and separators
    while True:
        line = json.dumps(
            {"custom_id": f"r{len(lines)}", "body": request_of(line_bytes, len(lines))}, ensure_ascii=False
        )
        n = len(line.encode()) + 1
        if size + n + margin > batch_bytes:
            break
        lines.append(line)
        size += n
    if reject_last and lines:
        lines[-1] = json.dumps({"custom_id": "r-bad", "body": {"model": "nope", "messages": []}})
    jsonl = ("\n".join(lines) + "\n").encode()
    js = ('{"requests": [' + ",".join(lines) + "]}").encode()
    return {"jsonl": jsonl, "json": js}


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.max_kb = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.max_kb = max(self.max_kb, proc_status_kb(self.pid, "VmRSS") or 0)
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join(5)
        return self.max_kb


def phase(kind: str, body: bytes, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"pcq-bench-uploads-{kind}-"))
    flush_own_redis_db(REDIS)
    with fresh_database(args.pg_admin, "pcqbench_uploads", migrate=True) as db:
        env = stack_env(db.sa_url, REDIS)
        env.update(PCQ_MAX_BATCH_BYTES=str(args.batch_mib * MIB), PCQ_LOG_LEVEL="WARNING")
        if args.code:
            env["PYTHONPATH"] = str(Path(args.code).resolve())
        else:
            env["PCQ_UPLOAD_TIMEOUT_SECONDS"] = "600"  # the client, on the same 2 cores, is slow too
        stack = Stack(env, workdir)
        try:
            stack.start_api()
            pid = stack.procs["api"].pid
            tenants = [
                create_key_at(db.sa_url, f"bench{t}") for t in range(math.ceil(args.uploads / PER_TENANT))
            ]
            ctype = "application/x-ndjson" if kind == "jsonl" else "application/json"
            # One small batch first, so the idle figure includes what the first request loads.
            warm = json.dumps({"custom_id": "w", "body": request_of(100, 0)}) + "\n"
            httpx.post(
                f"{stack.api_url}/v1/batches",
                content=warm,
                headers={"Authorization": f"Bearer {tenants[0]}", "Content-Type": "application/x-ndjson"},
                timeout=60,
            ).raise_for_status()
            idle_kb = proc_status_kb(pid, "VmRSS") or 0
            sampler = RssSampler(pid)
            sampler.start()
            answers: list[tuple[int, float, str]] = []
            lock = threading.Lock()

            def upload(k: int) -> None:
                t0 = time.perf_counter()
                try:
                    r = httpx.post(
                        f"{stack.api_url}/v1/batches",
                        content=body,
                        headers={
                            "Authorization": f"Bearer {tenants[k % len(tenants)]}",
                            "Content-Type": ctype,
                        },
                        timeout=args.timeout,
                    )
                    got = (
                        r.status_code,
                        time.perf_counter() - t0,
                        r.text[:200] if r.status_code >= 400 else "",
                    )
                except httpx.HTTPError as exc:
                    got = (0, time.perf_counter() - t0, repr(exc))
                with lock:
                    answers.append(got)

            # Another tenant reads and submits one job at a time while the uploads last.
            latencies: list[float] = []
            other_failed: list[str] = []
            uploading = threading.Event()
            uploading.set()

            def other_tenant() -> None:
                key = create_key_at(db.sa_url, "bystander")
                with httpx.Client(base_url=stack.api_url, headers={"x-api-key": key}, timeout=30) as client:
                    n = 0
                    while uploading.is_set():
                        n += 1
                        for method, path, kw in (
                            ("GET", "/v1/jobs", {"params": {"limit": 10}}),
                            (
                                "POST",
                                "/v1/jobs",
                                {"json": {"request": request_of(100, n), "custom_id": f"o{n}"}},
                            ),
                        ):
                            t1 = time.perf_counter()
                            r = client.request(method, path, **kw)
                            latencies.append(time.perf_counter() - t1)
                            if r.status_code >= 300:
                                other_failed.append(f"{method} {path}: {r.status_code}")
                        time.sleep(0.05)

            bystander = threading.Thread(target=other_tenant)
            bystander.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=upload, args=(k,)) for k in range(args.uploads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            uploading.clear()
            bystander.join(60)
            sampled_kb = sampler.stop()
            hwm_kb = proc_status_kb(pid, "VmHWM") or 0
            jobs = query(db.url, "SELECT count(*) FROM jobs")[0][0]
        finally:
            stack.stop_all()
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = sorted({text for status, _, text in answers if text})
    return {
        "kind": kind,
        "uploads": args.uploads,
        "body_mib": round(len(body) / MIB, 1),
        "statuses": statuses,
        "errors": errors[:3],
        "jobs_stored": jobs,
        "wall_s": round(wall, 1),
        "slowest_answer_s": round(max((s for _, s, _ in answers), default=0.0), 1),
        "api_rss_mb_idle": round(idle_kb / 1024, 1),
        "api_rss_mb_sampled_max": round(sampled_kb / 1024, 1),
        "api_vmhwm_mb": round(hwm_kb / 1024, 1),
        "other_tenant_requests": len(latencies),
        "other_tenant_failures": other_failed[:5],
        "other_tenant_ms": {
            "median": round(statistics.median(latencies) * 1000) if latencies else None,
            "p99": round(sorted(latencies)[int(len(latencies) * 0.99)] * 1000) if latencies else None,
            "max": round(max(latencies) * 1000) if latencies else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ops.bench.uploads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--uploads", type=int, default=8, help="concurrent uploads per phase")
    p.add_argument(
        "--batch-mib", type=int, default=64, help="PCQ_MAX_BATCH_BYTES in MiB, and each body's size"
    )
    p.add_argument("--line-kib", type=int, default=1020, help="size of each request (line or item) in KiB")
    p.add_argument("--kinds", default="jsonl,json", help="which bodies: jsonl, json")
    p.add_argument("--reject-last", action="store_true", help="make each batch's last request invalid")
    p.add_argument("--code", help="run the API from this checkout instead (PYTHONPATH)")
    p.add_argument("--timeout", type=float, default=900, help="client timeout per upload, seconds")
    p.add_argument("--pg-admin", default=PG_ADMIN)
    p.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    say(f"building bodies: {args.batch_mib} MiB of {args.line_kib} KiB requests ...")
    made = bodies(args.batch_mib * MIB, args.line_kib * 1024, args.reject_last)
    started = time.time()
    results = []
    for kind in kinds:
        say(f"{kind}: {args.uploads} concurrent uploads of {len(made[kind]) / MIB:.1f} MiB ...")
        results.append(phase(kind, made[kind], args))
        say(f"  {results[-1]}")
    flush_own_redis_db(REDIS)
    record = {
        "mode": "uploads",
        "command": "python -m ops.bench.uploads " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "duration_s": round(time.time() - started, 1),
        "result": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"uploads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    head = "| kind | uploads × MiB | answers | jobs stored | wall s | API RSS MB idle → peak (VmHWM) "
    head += "| other tenant ms median / p99 / max |"
    print(head)  # noqa: T201
    print("|---|---|---|---|---|---|---|")  # noqa: T201
    for r in results:
        answers = ", ".join(f"{n}× {s}" for s, n in sorted(r["statuses"].items()))
        o = r["other_tenant_ms"]
        print(  # noqa: T201
            f"| {r['kind']} | {r['uploads']} × {r['body_mib']} | {answers} | {r['jobs_stored']} "
            f"| {r['wall_s']} | {r['api_rss_mb_idle']:.0f} → {r['api_vmhwm_mb']:.0f} "
            f"| {o['median']} / {o['p99']} / {o['max']} |"
        )
    print(f"\nfull results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")  # noqa: T201
    return 0 if all(set(r["statuses"]) <= {"202", "422"} for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
