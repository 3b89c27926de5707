"""What the API's fleet gauges cost on a big database: ``python -m ops.bench.fleet``.

Seeds a fresh PostgreSQL database (pcq's schema at revision 0010, before the fix) with ``--jobs`` jobs in
batches of ``--batch-size``: ``--queued`` of them queued (every 50th a retry, half of those
due), 1,000 running, the rest succeeded, failed or cancelled; the queued and running ones in the
newest batches, as a backlog is. Plus one webhook event per 5 jobs, mostly delivered. All in SQL
(``generate_series``), then ``VACUUM ANALYZE`` (what autovacuum would have done).

Then times, median of ``--reads`` each:

  before   the four aggregates the API ran on every scrape until issue 13's fix (kept below)
  active   pcq.repositories.fleet.read_active: what the refresher reads every 5 s
  totals   pcq.repositories.fleet.read_totals: the ended jobs and events (every 60 s)

``before`` runs on revision 0010's schema; then the database is migrated to head (0011 builds
the two partial indexes) and ``active`` and ``totals`` run. It prints the plans of the oldest-job
and open-batch reads on both sides; the database is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from alembic import command
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from migrations.migrate import alembic_config, upgrade_to_head
from ops.bench.common import fresh_database
from pcq.db import make_engine, make_session_factory
from pcq.repositories.fleet import read_active, read_totals

# What api/metrics.py ran on each scrape (at most every 5 s) before: every job's status entry,
# every queued job's row, every active job's entry, every event's status entry.
BEFORE = (
    "SELECT status, count(*) FROM jobs GROUP BY status",
    "SELECT min(coalesce(next_attempt_at, created_at)) FROM jobs WHERE status = 'queued'"
    " AND (next_attempt_at IS NULL OR next_attempt_at <= :now)",
    "SELECT count(DISTINCT batch_id) FROM jobs WHERE status IN ('queued', 'running')"
    " AND batch_id IS NOT NULL",
    "SELECT status, count(*) FROM webhook_events GROUP BY status",
)

SEED = """
INSERT INTO tenants (id, name, weight, max_share, created_at) VALUES ('ten_bench', 'bench', 1, 1, now());
INSERT INTO batches (id, tenant_id, total, created_at)
  SELECT 'bat_' || lpad(b::text, 6, '0'), 'ten_bench', %(batch)s,
         now() - make_interval(secs => (%(batches)s - b) * 600)
  FROM generate_series(0, %(batches)s - 1) b;
INSERT INTO jobs (id, tenant_id, batch_id, request, model, stream, priority, status, attempts,
                  attempts_base, lease_losses, next_attempt_at, lease_until, created_at, updated_at)
  SELECT 'job_' || lpad(n::text, 8, '0'), 'ten_bench',
         'bat_' || lpad((n / %(batch)s)::text, 6, '0'),
         '{"model": "lite", "messages": [{"role": "user", "content": "q"}]}', 'lite', false, 1,
         s.status, 1, 0, 0,
         CASE WHEN s.status = 'queued' AND n %% 50 = 0
              THEN now() + make_interval(secs => CASE WHEN n %% 100 = 0 THEN 600 ELSE -300 END) END,
         CASE WHEN s.status = 'running' THEN now() + interval '5 minutes' END,
         now() - make_interval(secs => (%(jobs)s - n) * 0.6), now()
  FROM generate_series(0, %(jobs)s - 1) n,
  LATERAL (SELECT CASE
      WHEN n >= %(jobs)s - %(queued)s THEN 'queued'
      WHEN n >= %(jobs)s - %(queued)s - 1000 THEN 'running'
      WHEN n %% 20 = 0 THEN 'failed'
      WHEN n %% 97 = 0 THEN 'cancelled'
      ELSE 'succeeded' END AS status) s;
INSERT INTO webhook_events (id, tenant_id, type, job_id, url, status, created_at, next_attempt_at, failures)
  SELECT 'msg_' || lpad(n::text, 8, '0'), 'ten_bench', 'job.succeeded',
         'job_' || lpad((n * 5)::text, 8, '0'), 'https://hooks.example/pcq',
         CASE WHEN n %% 100 = 0 THEN 'pending' WHEN n %% 37 = 0 THEN 'failed' ELSE 'delivered' END,
         now(), now(), 0
  FROM generate_series(0, %(jobs)s / 5 - 1) n;
"""


def median_ms(read: Callable[[], Any], times: int) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        read()
        samples.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(samples), 2)


def plan(session: Session, sql: str, **params: Any) -> list[str]:
    rows = session.execute(text("EXPLAIN (ANALYZE, COSTS OFF, BUFFERS) " + sql), params)
    return [r[0] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--queued", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=500, help="jobs per batch (1,000,000 / 500 = 2,000)")
    p.add_argument("--reads", type=int, default=10)
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args()
    out: dict[str, Any] = {"jobs": args.jobs, "queued": args.queued, "batches": args.jobs // args.batch_size}
    with fresh_database(args.pg_admin, "pcqbench_fleet", migrate=False) as db:
        command.upgrade(alembic_config(db.sa_url), "0010")  # the schema before the fix
        t0 = time.perf_counter()
        with psycopg.connect(db.url, autocommit=True) as c:
            params = {"jobs": args.jobs, "queued": args.queued, "batch": args.batch_size}
            params["batches"] = -(-args.jobs // args.batch_size)
            for statement in SEED.split(";\n"):
                if statement.strip():
                    c.execute(statement, params)  # type: ignore[arg-type]  (our own text)
            c.execute("VACUUM ANALYZE")
        out["seed_seconds"] = round(time.perf_counter() - t0, 1)
        engine = make_engine(db.sa_url, pool_size=1, max_overflow=0)
        sessions = make_session_factory(engine)
        now = datetime.now(UTC)

        def before() -> None:
            with sessions() as s:
                for sql in BEFORE:
                    s.execute(text(sql), {"now": now}).all()

        def active() -> None:
            with sessions() as s:
                read_active(s, now=now)

        def totals() -> None:
            with sessions() as s:
                read_totals(s)

        before()  # warm the cache, so each side reads from memory
        out["median_ms"] = {"before": median_ms(before, args.reads)}
        with sessions() as s:
            out["plans"] = {
                "oldest_before": plan(s, BEFORE[1], now=now),
                "batches_before": plan(s, BEFORE[2]),
            }
        engine.dispose()
        t0 = time.perf_counter()
        upgrade_to_head(db.sa_url)  # 0011: the two partial indexes, built CONCURRENTLY
        out["migrate_0011_seconds"] = round(time.perf_counter() - t0, 1)
        active()
        totals()
        out["median_ms"] |= {"active": median_ms(active, args.reads), "totals": median_ms(totals, args.reads)}
        with sessions() as s:
            out["values"] = {"active": repr(read_active(s, now=now)), "totals": repr(read_totals(s))}
            out["plans"] |= {
                "oldest_never_retried": plan(
                    s, "SELECT min(created_at) FROM jobs WHERE status = 'queued' AND next_attempt_at IS NULL"
                ),
                "oldest_retried": plan(
                    s,
                    "SELECT min(next_attempt_at) FROM jobs"
                    " WHERE status = 'queued' AND next_attempt_at <= :now",
                    now=now,
                ),
            }
            seen: list[str] = []
            event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
            read_active(s, now=now)
            [skip_scan] = [sql for sql in seen if sql.startswith("WITH RECURSIVE")]
            out["plans"]["batches_skip_scan"] = plan(s, skip_scan)
        engine.dispose()
    print(json.dumps(out, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
