"""The ceiling: a bare asyncio client that does the same work as pcq, minus the durability.

One process of it (the benchmark starts two) takes a slice of the jobs, calls the mock with
aiohttp (uvloop when importable), parses each answer with ``json.loads`` and hands the result
row and citation rows to writers that insert them with batched SQLAlchemy Core statements
(``insert(table)`` with a list of rows: one multi-row INSERT per table per batch), each
writer's transaction in a thread (SQLAlchemy's asyncio layer needs greenlet, which is not
installed; pcq's engine runs its database work in threads the same way). No API,
no jobs table, no broker, no limiter, no attempt rows, no retries, no leases.

Protocol with the benchmark: prints ``ready`` once connected, waits for a line on stdin,
runs, then writes a JSON report to ``--report``: CPU seconds and peak RSS of this process over the run, and
the wall-clock (epoch) time at which each job's rows were committed.

    python -m ops.bench.ceiling --url URL --db postgresql+psycopg://... --start 0 --count 5000 \\
        --report /tmp/ceiling-0.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import Engine, create_engine, insert

from ops.bench.tables import bench_tables, request_for, rows_for

WRITE_BATCH = 200  # jobs per transaction at most
Item = tuple[dict[str, Any], list[dict[str, Any]]]


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def writer(engine: Engine, queue: asyncio.Queue[Item | None], done: list[float]) -> None:
    _, results, citations = bench_tables("ceil")

    def write(batch: list[Item]) -> None:
        with engine.begin() as conn:
            conn.execute(insert(results), [r for r, _ in batch])
            cites = [c for _, cs in batch for c in cs]
            if cites:
                conn.execute(insert(citations), cites)

    loop = asyncio.get_running_loop()
    while True:
        first = await queue.get()
        if first is None:
            queue.put_nowait(None)  # let the other writers see the end too
            return
        batch = [first]
        while len(batch) < WRITE_BATCH and not queue.empty():
            item = queue.get_nowait()
            if item is None:
                queue.put_nowait(None)  # let the other writers see the end too
                break
            batch.append(item)
        await loop.run_in_executor(None, write, batch)
        now = time.time()
        done.extend(now for _ in batch)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = create_engine(args.db, pool_size=args.writers, max_overflow=0)
    for conn in [engine.connect() for _ in range(args.writers)]:
        conn.close()  # connect before the clock starts
    connector = aiohttp.TCPConnector(limit=args.in_flight, limit_per_host=args.in_flight)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=args.timeout), raise_for_status=False
    )
    headers = {"Authorization": "Bearer sk-bench", "x-api-key": "sk-bench"}
    url = args.url.rstrip("/") + "/v1beta/chat/completions"
    queue: asyncio.Queue[Item | None] = asyncio.Queue()
    done: list[float] = []
    errors = 0
    slots = asyncio.Semaphore(args.in_flight)

    async def one(i: int) -> None:
        nonlocal errors
        async with slots:
            try:
                async with session.post(url, json=request_for(i), headers=headers) as resp:
                    body = await resp.text()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                return
        if status != 200:
            errors += 1
            return
        queue.put_nowait(rows_for(f"c{i}", body, json.loads(body), datetime.now(UTC), "bench", "ceiling"))

    print("ready", flush=True)  # noqa: T201
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0, t0 = cpu_now(), time.time()
    writers = [asyncio.create_task(writer(engine, queue, done)) for _ in range(args.writers)]
    await asyncio.gather(*(one(i) for i in range(args.start, args.start + args.count)))
    queue.put_nowait(None)
    await asyncio.gather(*writers)
    t1, cpu1 = time.time(), cpu_now()
    await session.close()
    engine.dispose()
    return {
        "started": t0,
        "finished": t1,
        "cpu_s": cpu1 - cpu0,
        # VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork + exec (it would report the
        # benchmark driver's peak); VmHWM belongs to this process's own address space.
        "peak_rss_mb": round(vm_hwm_kb() / 1024, 1),
        "errors": errors,
        "done_at": done,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the mock upstream")
    p.add_argument("--db", required=True, help="postgresql+psycopg:// URL of the bench database")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--in-flight", type=int, default=1000)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    args = p.parse_args()
    try:
        loop_factory = importlib.import_module("uvloop").new_event_loop
        loop_name = "uvloop"
    except ImportError:
        loop_factory, loop_name = None, "asyncio"
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        out = runner.run(run(args))
    out["loop"] = loop_name
    args.report.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
