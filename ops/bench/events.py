"""What one poll of a batch's event stream costs in PostgreSQL: ``python -m ops.bench.events``.

``GET /v1/batches/{id}/events`` (api/events.py) counts the batch's jobs per status about once
a second for as long as a client watches. This seeds ``--batches`` batches of ``--jobs`` jobs
(statuses mixed as in a batch under way) in a fresh database, then times that count through the
code the stream runs (``api.service.batch_counts`` in a session of its own, the session's
checkout included), ``--polls`` times:

  vacuumed   after VACUUM ANALYZE: an index-only scan of ix_jobs_batch_status
  churned    after ``--churn`` of the batch's jobs changed status, before any vacuum: the
             index-only scan must visit the heap pages the updates touched
  max(updated_at)  for comparison, the query an updated_at-based event id would need

It prints p50/p99/max in ms and the plan of the poll query (EXPLAIN ANALYZE, BUFFERS).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg
from sqlalchemy import text

from api import service
from ops.bench.common import fresh_database, percentile
from pcq.db import make_engine, make_session_factory
from pcq.tenants import create_key_at

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
POLL_SQL = "SELECT status, count(*) FROM jobs WHERE batch_id = %s GROUP BY status"

# A batch under way: most jobs ended, some running, the rest queued.
SEED = """
INSERT INTO jobs (id, tenant_id, batch_id, request, model, stream, status, attempts, attempts_base,
                  lease_losses, created_at, updated_at)
SELECT %(batch)s || '_' || lpad(i::text, 7, '0'), %(tenant)s, %(batch)s,
       '{"model":"lite","messages":[{"role":"user","content":"q"}]}', 'lite', false,
       CASE WHEN i %% 100 < 55 THEN 'succeeded' WHEN i %% 100 < 60 THEN 'failed'
            WHEN i %% 100 < 62 THEN 'cancelled' WHEN i %% 100 < 67 THEN 'running' ELSE 'queued' END,
       1, 0, 0, now(), now() - (i || ' ms')::interval
FROM generate_series(1, %(jobs)s) AS i
"""


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)  # noqa: T201


def timed(fn: Callable[[], object], n: int) -> str:
    took = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        took.append((time.perf_counter() - start) * 1000)
    return f"p50 {percentile(took, 50):.2f} ms, p99 {percentile(took, 99):.2f} ms, max {max(took):.2f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs per batch")
    p.add_argument(
        "--batches", type=int, default=4, help="batches in the table (the one polled is the first)"
    )
    p.add_argument("--polls", type=int, default=200)
    p.add_argument(
        "--churn", type=float, default=0.3, help="share of the batch's jobs changed before 'churned'"
    )
    p.add_argument("--pg-admin", default=PG_ADMIN)
    args = p.parse_args()

    with fresh_database(args.pg_admin, "pcq_bench_events", migrate=True) as db:
        create_key_at(db.sa_url, "bench")
        with psycopg.connect(db.url, autocommit=True) as c:
            (tenant,) = c.execute("SELECT id FROM tenants").fetchone() or ("",)
            batches = [f"bat_bench{b}" for b in range(args.batches)]
            started = time.perf_counter()
            for b in batches:
                c.execute(
                    "INSERT INTO batches (id, tenant_id, total, created_at) VALUES (%s, %s, %s, now())",
                    (b, tenant, args.jobs),
                )
                c.execute(SEED, {"batch": b, "tenant": tenant, "jobs": args.jobs})
            c.execute("VACUUM ANALYZE jobs")
            say(f"seeded {args.batches} x {args.jobs:,} jobs in {time.perf_counter() - started:.1f} s")

            engine = make_engine(db.sa_url)
            sessions = make_session_factory(engine)
            polled = batches[0]

            def poll() -> None:
                with sessions() as session:
                    service.batch_counts(session, polled)

            def max_updated() -> None:
                with sessions() as session:
                    session.execute(
                        text("SELECT max(updated_at) FROM jobs WHERE batch_id = :b"), {"b": polled}
                    ).scalar()

            poll()  # warm the pool and the cache
            say(f"vacuumed         {timed(poll, args.polls)}")
            plan = c.execute("EXPLAIN (ANALYZE, BUFFERS) " + POLL_SQL, (polled,)).fetchall()
            say("  " + "\n  ".join(row[0] for row in plan))
            say(f"max(updated_at)  {timed(max_updated, args.polls)}")

            c.execute(
                "UPDATE jobs SET status = 'succeeded', updated_at = now() "
                "WHERE batch_id = %s AND status IN ('queued', 'running') AND random() < %s",
                (polled, args.churn / 0.38),  # 38% of the batch is queued or running
            )
            say(f"churned          {timed(poll, args.polls)}")
            plan = c.execute("EXPLAIN (ANALYZE, BUFFERS) " + POLL_SQL, (polled,)).fetchall()
            say("  " + "\n  ".join(row[0] for row in plan))
            engine.dispose()


if __name__ == "__main__":
    main()
