"""How much the worker's row writes cost, by insert method: ``python -m ops.bench.inserts``.

The throughput profile once put ~37% of the pcq worker's CPU in one line that wrote the
results, usage, basis and citation rows with ``session.execute(insert(Model), rows)``
(ORM-enabled bulk INSERT; psycopg 3 runs an ``executemany`` without RETURNING as one pipelined
INSERT per row); that led the worker to COPY. This compares, on pcq's
own schema in a fresh database, the same rows (1 result + 1 usage + 1 basis field + 10
citations per job, 200 jobs per transaction, as the writer batches them) written as:

  orm   session.execute(insert(Model), rows)            what pcq did first
  core  connection.execute(insert(Model.__table__), rows)  Core, still one INSERT per row
  copy  psycopg COPY ... FROM STDIN, one per table      what the worker does (insert_answers)

and reports client CPU (this process) and PostgreSQL backend CPU per job.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert, text
from sqlalchemy.orm import Session

from ops.bench.common import fresh_database
from ops.bench.measure import proc_cpu
from pcq.db import make_engine, make_session_factory
from pcq.jobs.lifecycle import AnswerRows, ClaimedJob
from pcq.models import BasisField, Batch, Citation, Job, Result, Tenant, Usage
from pcq.models.base import new_id
from pcq.repositories import results as result_rows
from pcq.wire import parse_completion

TABLES: list[tuple[str, type[Any]]] = [
    ("results", Result),
    ("usage", Usage),
    ("basis_fields", BasisField),
    ("citations", Citation),
]


def sample_body(citations: int) -> str:
    """One answer as the mock upstream writes it (text format: one basis field)."""
    from mock_upstream.server import MockConfig, _completion, _Directives, _State

    st = _State(config=MockConfig(citations_per_field=citations), rng=__import__("random").Random(1))
    payload = {"model": "lite", "messages": [{"role": "user", "content": "bench question 1"}]}
    return json.dumps(_completion(st, payload, "bench question 1", _Directives()))


def rows_for(job_ids: list[str], body: str, tenant: str, batch: str) -> dict[str, list[dict[str, Any]]]:
    """The rows ``_store_completions`` builds, per table (its own ``AnswerRows``)."""
    c = parse_completion(body, None)
    now = datetime.now(UTC)
    rows = AnswerRows()
    for job_id in job_ids:
        rows.add(ClaimedJob(job_id, tenant, batch, 1, ""), c, now)
    return {
        "results": rows.results,
        "usage": rows.usage,
        "basis_fields": rows.basis,
        "citations": rows.citations,
    }


def write_orm(session: Session, rows: dict[str, list[dict[str, Any]]]) -> None:
    for name, model in TABLES:
        session.execute(insert(model), rows[name])


def write_core(session: Session, rows: dict[str, list[dict[str, Any]]]) -> None:
    conn = session.connection()
    for name, model in TABLES:
        table: Table = model.__table__
        conn.execute(insert(table), rows[name])


def write_copy(session: Session, rows: dict[str, list[dict[str, Any]]]) -> None:
    """What the worker runs (pcq.repositories.results.insert_answers: COPY on PostgreSQL)."""
    result_rows.insert_answers(
        session,
        results=rows["results"],
        usage=rows["usage"],
        basis=rows["basis_fields"],
        citations=rows["citations"],
    )


METHODS = {"orm": write_orm, "core": write_core, "copy": write_copy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=4000, help="jobs per method")
    p.add_argument("--batch", type=int, default=200, help="jobs per transaction (the writer's WRITE_BATCH)")
    p.add_argument("--citations", type=int, default=10)
    p.add_argument("--methods", default="orm,core,copy", help="which methods, in this order")
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    body = sample_body(args.citations)
    with fresh_database(args.pg_admin, "pcqbench_inserts", migrate=True) as db:
        engine = make_engine(db.sa_url, pool_size=1, max_overflow=0)
        sessions = make_session_factory(engine)
        now = datetime.now(UTC)
        with sessions.begin() as s:
            s.add(Tenant(id="ten_bench", name="bench"))
            s.flush()
            s.add(Batch(id="bat_bench", tenant_id="ten_bench", total=0, created_at=now))
            s.flush()
            ids = {m: [new_id("job") for _ in range(args.jobs)] for m in methods}
            all_ids = [i for v in ids.values() for i in v]
            for start in range(0, len(all_ids), 1000):
                s.execute(
                    insert(Job),
                    [
                        {
                            "id": i,
                            "tenant_id": "ten_bench",
                            "batch_id": "bat_bench",
                            "request_json": '{"model": "lite"}',
                            "model": "lite",
                            "status": "running",
                            "created_at": now,
                            "updated_at": now,
                        }
                        for i in all_ids[start : start + 1000]
                    ],
                )
        out: dict[str, dict[str, float]] = {}
        for method, write in methods.items():
            with sessions() as s:
                backend = int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
                s.commit()
                pg0, cpu0, t0 = proc_cpu(backend) or 0.0, time.process_time(), time.perf_counter()
                for start in range(0, args.jobs, args.batch):
                    chunk = ids[method][start : start + args.batch]
                    rows = rows_for(chunk, body, "ten_bench", "bat_bench")
                    write(s, rows)
                    s.commit()
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                pg = (proc_cpu(backend) or 0.0) - pg0
            out[method] = {
                "client_cpu_ms_per_job": round(cpu * 1000 / args.jobs, 3),
                "postgres_cpu_ms_per_job": round(pg * 1000 / args.jobs, 3),
                "wall_ms_per_job": round(wall * 1000 / args.jobs, 3),
            }
        counts = {
            name: s.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()  # noqa: S608
            for s in [sessions()]
            for name, _ in TABLES
        }
        engine.dispose()
    print(json.dumps({"jobs_per_method": args.jobs, "batch": args.batch, "rows": counts, **out}, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
