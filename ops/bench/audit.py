"""Audit queries at scale: ``python -m ops.bench audit``.

Seeds a fresh PostgreSQL database (pcq's own schema, migrated to head) with ``--jobs`` jobs
(100,000) of ``--citations`` citations each (10: 1,000,000 citation rows), then times each
audit query as the API runs it (``api.service.list_citations`` / ``batch_domains`` in a
session per call, rows shaped by ``api.views``, as a request does): every filter of
``GET /v1/citations`` alone, a few realistic combinations, the first page and a deep page
(the cursor after 50 pages of 50), and ``GET /v1/batches/{id}/domains`` on a big batch.

The data, seeded with a fixed ``random.Random``:

* four tenants with 55/25/15/5 % of the jobs; the largest has one 20,000-job batch, the
  others batches of 2,000-5,000 jobs; a tenth of each tenant's jobs are single jobs;
* 30 days of answers: a batch's jobs finish within its run (0.1 s per job), single jobs
  any time; citation rows are written in finishing order, with up to 2 s of disorder between
  ``created_at`` and id order (concurrent writers);
* half the jobs answer text (one field, ``output``), half JSON (two of eight field names, one
  job in 500 with a rare one); confidence low/medium/high/none at 15/30/50/5 %;
* domains Zipf-distributed over 50,010 (p ∝ 1/rank: en.wikipedia.org ~6 % of citations, a
  long tail of hosts cited a handful of times); URLs popular within a head domain (Zipf
  over 100,000 pages), mostly unique in the tail.

After seeding: ``VACUUM (ANALYZE)``, as autovacuum leaves a table at rest (statistics, and the
visibility map that index-only scans need). Each query runs ``--samples`` times (after one
untimed run); p50 and p99 are nearest-rank over those. The plan of each query's last run
(``EXPLAIN (ANALYZE, BUFFERS)``) is kept in the JSON.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import event
from sqlalchemy.orm import Session

from api import service, views
from ops.bench.common import fresh_database, percentile
from pcq.db import make_engine, make_session_factory
from pcq.repositories.results import CitationFilter, text_md5

TENANTS = (("ten_audit_a", 0.55), ("ten_audit_b", 0.25), ("ten_audit_c", 0.15), ("ten_audit_d", 0.05))
BIG_BATCH = 20_000
JSON_FIELDS = ("name", "founded_year", "headquarters", "ceo", "revenue", "employees", "industry", "website")
RARE_FIELD = "board_members[2].tenure_notes"
CONFIDENCE = (("low", 0.15), ("medium", 0.30), ("high", 0.50), (None, 0.05))
HEAD = (
    "en.wikipedia.org",
    "www.reuters.com",
    "www.bloomberg.com",
    "www.sec.gov",
    "github.com",
    "www.nytimes.com",
    "arxiv.org",
    "www.britannica.com",
    "www.bbc.com",
    "www.nature.com",
)
TAIL = 50_000
DAYS = 30
PAGE = 50
DEEP_PAGES = 50


def say(*parts: object) -> None:
    print(*parts, flush=True)  # noqa: T201


@dataclass
class SeedJob:
    id: str
    tenant: str
    batch: str | None
    custom_id: str | None
    finished: datetime


def zipf_rank(rng: random.Random, n: int) -> int:
    """A rank in [0, n) with p(rank) ∝ 1 / (rank + 1), by inverting a log-uniform draw."""
    return min(n - 1, int(math.exp(rng.random() * math.log(n + 1))) - 1)


def plan_jobs(rng: random.Random, jobs: int, start: datetime) -> tuple[list[SeedJob], list[tuple[str, str]]]:
    """Every job (tenant, batch, custom_id, when it finished), in finishing order, and the
    batches as (id, tenant)."""
    out: list[SeedJob] = []
    batches: list[tuple[str, str]] = []
    span = DAYS * 86400
    for t, (tenant, share) in enumerate(TENANTS):
        mine = int(jobs * share)
        singles = mine // 10
        sizes = [BIG_BATCH] if t == 0 and mine - singles > BIG_BATCH else []
        left = mine - singles - sum(sizes)
        while left > 0:
            size = min(left, rng.choice((2_000, 3_000, 5_000)))
            sizes.append(size)
            left -= size
        for b, size in enumerate(sizes):
            batch = f"bat_{tenant[-1]}{b:04d}"
            batches.append((batch, tenant))
            begin = rng.random() * (span - size * 0.1)
            for i in range(size):
                finished = start + timedelta(seconds=begin + rng.random() * size * 0.1)
                out.append(SeedJob(f"job_{tenant[-1]}{len(out):08d}", tenant, batch, f"row-{i}", finished))
        for _ in range(singles):
            custom = f"req-{rng.randrange(10**9)}" if rng.random() < 0.5 else None
            finished = start + timedelta(seconds=rng.random() * span)
            out.append(SeedJob(f"job_{tenant[-1]}{len(out):08d}", tenant, None, custom, finished))
    # Written in finishing order, give or take 2 s: several writers commit concurrently.
    out.sort(key=lambda j: j.finished + timedelta(seconds=rng.random() * 2))
    return out, batches


def citation_url(rng: random.Random) -> tuple[str, str]:
    rank = zipf_rank(rng, len(HEAD) + TAIL)
    if rank < len(HEAD):
        domain = HEAD[rank]
        return f"https://{domain}/wiki/Page_{zipf_rank(rng, 100_000)}", domain
    domain = f"site{rank - len(HEAD)}.example.com"
    return f"https://{domain}/articles/{rng.randrange(1_000_000)}", domain


def weighted(rng: random.Random, options: tuple[tuple[str | None, float], ...]) -> str | None:
    x = rng.random()
    for value, p in options:
        x -= p
        if x < 0:
            return value
    return options[-1][0]


def seed(url: str, jobs: int, per_job: int, rng: random.Random) -> dict[str, Any]:
    start = datetime(2026, 10, 1, tzinfo=UTC)
    planned, batches = plan_jobs(rng, jobs, start)
    t0 = time.perf_counter()
    n_cites = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY tenants (id, name, created_at) FROM STDIN") as cp:
            for tenant, _ in TENANTS:
                cp.write_row((tenant, tenant, start))
        with cur.copy("COPY batches (id, tenant_id, total, created_at) FROM STDIN") as cp:
            sizes: dict[str, int] = {}
            for j in planned:
                if j.batch:
                    sizes[j.batch] = sizes.get(j.batch, 0) + 1
            for batch, tenant in batches:
                cp.write_row((batch, tenant, sizes[batch], start))
        cols = "id, tenant_id, batch_id, custom_id, request, model, stream, status, attempts"
        cols += ", created_at, updated_at"
        with cur.copy(f"COPY jobs ({cols}) FROM STDIN") as cp:
            for j in planned:
                created = j.finished - timedelta(seconds=60)
                cp.write_row(
                    (j.id, j.tenant, j.batch, j.custom_id, '{"model":"lite"}', "lite", False, "succeeded", 1)
                    + (created, j.finished)
                )
        fields: list[tuple[str, int, str, str | None, int]] = []  # job, position, field, confidence, cites
        with cur.copy("COPY basis_fields (job_id, position, field, reasoning, confidence) FROM STDIN") as cp:
            for j in planned:
                if rng.random() < 0.5:
                    names = ["output"]
                else:
                    names = rng.sample(JSON_FIELDS, 2)
                    if rng.random() < 0.002:
                        names[1] = RARE_FIELD
                for pos, name in enumerate(names):
                    conf = weighted(rng, CONFIDENCE)
                    share = per_job // len(names) + (per_job % len(names) if pos == 0 else 0)
                    fields.append((j.id, pos, name, conf, share))
                    cp.write_row((j.id, pos, name, f"The {name} was cross-checked against sources.", conf))
        cols = "tenant_id, job_id, batch_id, field, field_position, position, url, domain, title, excerpts"
        with cur.copy(f"COPY citations ({cols}, confidence, created_at, field_md5) FROM STDIN") as cp:
            by_id = {j.id: j for j in planned}
            for job_id, pos, name, conf, share in fields:
                j = by_id[job_id]
                for cpos in range(share):
                    link, domain = citation_url(rng)
                    excerpts = ["An excerpt of the source that supports the field's value."] * (1 + cpos % 2)
                    title = None if cpos % 7 == 0 else f"Source {cpos} on {name}"
                    cp.write_row(
                        (j.tenant, j.id, j.batch, name, pos, cpos, link, domain, title, Jsonb(excerpts))
                        + (conf, j.finished, text_md5(name))
                    )
                    n_cites += 1
        # As the worker keeps them, one transaction at a time (revision 0007 counts them so).
        cur.execute(
            "INSERT INTO batch_domains (batch_id, domain, citations, jobs)"
            " SELECT batch_id, coalesce(domain, ''), count(*), count(DISTINCT job_id) FROM citations"
            " WHERE batch_id IS NOT NULL GROUP BY 1, 2"
        )
        conn.commit()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        size = conn.execute(
            "SELECT pg_total_relation_size('citations'), pg_relation_size('citations')"
        ).fetchone()
        assert size is not None
    return {
        "jobs": len(planned),
        "citations": n_cites,
        "batches": len(batches),
        "load_s": round(load_s, 1),
        "vacuum_analyze_s": round(time.perf_counter() - t1, 1),
        "citations_table_mb": round(size[1] / 2**20),
        "citations_with_indexes_mb": round(size[0] / 2**20),
    }


@dataclass
class Case:
    name: str
    tenant: str
    where: CitationFilter


def cases(url: str) -> list[Case]:
    """The queries, with values picked from the seeded data the way a user would name them."""
    a, d = TENANTS[0][0], TENANTS[-1][0]

    def one(sql: str, *params: Any) -> Any:
        with psycopg.connect(url) as c:
            row = c.execute(sql, params).fetchone()
        assert row is not None, sql
        return row[0]

    n = one("SELECT count(*) FROM citations WHERE tenant_id = %s", a)
    job = one("SELECT job_id FROM citations WHERE tenant_id = %s ORDER BY id OFFSET %s LIMIT 1", a, n // 4)
    big = one(
        "SELECT batch_id FROM citations WHERE tenant_id = %s GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", a
    )
    rare_domain = one(
        "SELECT domain FROM citations WHERE tenant_id = %s GROUP BY 1 HAVING count(*) BETWEEN 3 AND 10"
        " ORDER BY 1 LIMIT 1",
        a,
    )
    popular_url = one(
        "SELECT url FROM citations WHERE tenant_id = %s AND domain = 'en.wikipedia.org'"
        " AND url = 'https://en.wikipedia.org/wiki/Page_0' LIMIT 1",
        a,
    )
    unique_url = one(
        "SELECT url FROM citations WHERE tenant_id = %s AND domain LIKE 'site%%'"
        " ORDER BY id OFFSET %s LIMIT 1",
        a,
        n // 3,
    )

    def at(q: float) -> datetime:
        value: datetime = one(
            "SELECT percentile_disc(%s) WITHIN GROUP (ORDER BY created_at)"
            " FROM citations WHERE tenant_id = %s",
            q,
            a,
        )
        return value

    last_day, first_day = at(1 - 1 / DAYS), at(1 / DAYS)
    start = at(0)
    mid, mid_next = at(0.5), at(0.5 + 1 / DAYS)
    last_week = at(1 - 7 / DAYS)
    three_weeks = at(1 - 21 / DAYS)
    f = CitationFilter
    return [
        Case("no filter (largest tenant, 55 %)", a, f()),
        Case("no filter (smallest tenant, 5 %)", d, f()),
        Case("job_id", a, f(job_id=job)),
        Case("batch_id (20,000 jobs)", a, f(batch_id=big)),
        Case("custom_id (row-17: one job per batch)", a, f(custom_id="row-17")),
        Case("domain, most cited (en.wikipedia.org)", a, f(domain="en.wikipedia.org")),
        Case(f"domain, tail ({rare_domain})", a, f(domain=rare_domain)),
        Case("url, popular", a, f(url=popular_url)),
        Case("url, unique", a, f(url=unique_url)),
        Case("field, common (output)", a, f(field="output")),
        Case("field, rare", a, f(field=RARE_FIELD)),
        Case("field, absent", a, f(field="no_such_field")),
        Case("confidence=low (15 %)", a, f(confidence="low")),
        Case("confidence=high (50 %)", a, f(confidence="high")),
        Case("created_after (last day)", a, f(created_after=last_day)),
        Case("created_after (last week)", a, f(created_after=last_week)),
        Case("created_after (last 3 weeks: 70 % of rows)", a, f(created_after=three_weeks)),
        Case("created_after (the whole month: every row)", a, f(created_after=start - timedelta(days=1))),
        Case("created_before (first day)", a, f(created_before=first_day)),
        Case(
            "created_after + created_before (a day mid-month)",
            a,
            f(created_after=mid, created_before=mid_next),
        ),
        Case("batch_id + confidence=low", a, f(batch_id=big, confidence="low")),
        Case(
            "domain=en.wikipedia.org + created_after (last week)",
            a,
            f(domain="en.wikipedia.org", created_after=last_week),
        ),
        Case("field=output + confidence=low", a, f(field="output", confidence="low")),
        Case("confidence=low + created_after (last week)", a, f(confidence="low", created_after=last_week)),
        Case("field=ceo + created_after (last week)", a, f(field="ceo", created_after=last_week)),
        Case("field=output + created_after (last week)", a, f(field="output", created_after=last_week)),
    ]


class LastStatement:
    """The last SQL statement an engine ran, to EXPLAIN it afterwards."""

    def __init__(self) -> None:
        self.sql = ""
        self.params: Any = None

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:  # noqa: ARG002
        self.sql, self.params = statement, parameters


def timed(samples: int, call: Callable[[], object]) -> dict[str, float]:
    call()  # warm: the plan cache, the pool's connection
    lat = []
    for _ in range(samples):
        t = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2)}


def explain(session: Session, last: LastStatement) -> str:
    rows = session.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + last.sql, last.params).all()
    return "\n".join(r[0] for r in rows)


def measure(url: str, sa_url: str, samples: int) -> list[dict[str, Any]]:
    engine = make_engine(sa_url, pool_size=1, max_overflow=0)
    sessions = make_session_factory(engine)
    last = LastStatement()
    event.listen(engine, "before_cursor_execute", last)

    def in_session(fn: Callable[[Session], object]) -> Callable[[], object]:
        def call() -> object:
            with sessions() as s:
                try:
                    return fn(s)
                finally:
                    s.rollback()

        return call

    def page(case: Case, cursor: str | None) -> Callable[[Session], object]:
        def run(s: Session) -> object:
            rows, nxt = service.list_citations(s, case.tenant, case.where, cursor=cursor, limit=PAGE)
            return [views.citation_row(*r) for r in rows], nxt

        return run

    out: list[dict[str, Any]] = []
    for case in cases(url):
        with sessions() as s:
            ahead, _ = service.list_citations(
                s, case.tenant, case.where, cursor=None, limit=PAGE * DEEP_PAGES + 1
            )
        deep = (
            service.encode_cursor(ahead[PAGE * DEEP_PAGES - 1][0].id)
            if len(ahead) > PAGE * DEEP_PAGES
            else None
        )
        row: dict[str, Any] = {"query": case.name, "matches_first_2501": len(ahead)}
        for label, cursor in (("first", None), ("deep", deep)):
            if label == "deep" and cursor is None:
                continue
            row[label] = timed(samples, in_session(page(case, cursor)))
            with sessions() as s:
                page(case, cursor)(s)
                row[label]["plan"] = explain(s, last)
        out.append(row)
        say(
            f"  {case.name}: first {row['first']['p50_ms']}/{row['first']['p99_ms']} ms"
            + (
                f", deep {row['deep']['p50_ms']}/{row['deep']['p99_ms']} ms"
                if "deep" in row
                else ", deep n/a"
            )
        )
    with psycopg.connect(url) as c:
        batches = (
            c.execute(
                "SELECT batch_id, tenant_id, count(*) FROM citations WHERE batch_id IS NOT NULL"
                " GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 1"
            ).fetchall()
            + c.execute(
                "SELECT batch_id, tenant_id, count(*) FROM citations WHERE batch_id IS NOT NULL"
                " GROUP BY 1, 2 ORDER BY 3 LIMIT 1"
            ).fetchall()
        )
    for batch, tenant, n in batches:
        name = f"/domains, batch of {n:,} citations"
        fn = in_session(functools.partial(domains_of, batch=batch, tenant=tenant))
        row = {"query": name, "first": timed(samples, fn)}
        with sessions() as s:
            service.batch_domains(s, tenant, batch, cursor=None, limit=100)
            row["first"]["plan"] = explain(s, last)
        out.append(row)
        say(f"  {name}: {row['first']['p50_ms']}/{row['first']['p99_ms']} ms")
    engine.dispose()
    return out


def audit(args: argparse.Namespace, outdir: Path) -> dict[str, Any]:  # noqa: ARG001
    with fresh_database(args.pg_admin, "pcqbench_audit", migrate=True) as db:
        say(f"seeding {args.jobs:,} jobs x {args.citations} citations into {db.name} ...")
        seeded = seed(db.url, args.jobs, args.citations, random.Random(11))
        say(f"  {seeded}")
        results = measure(db.url, db.sa_url, args.samples)
    return {
        "seed": seeded,
        "samples": args.samples,
        "page": PAGE,
        "deep_after_pages": DEEP_PAGES,
        "queries": results,
    }


def domains_of(session: Session, *, batch: str, tenant: str) -> object:
    return service.batch_domains(session, tenant, batch, cursor=None, limit=100)


def audit_table(res: dict[str, Any]) -> str:
    lines = [
        "| query | first page p50 / p99 ms | deep page (after 50 pages) p50 / p99 ms |",
        "|---|---|---|",
    ]
    for q in res["queries"]:
        deep = q.get("deep")
        cell = f"{deep['p50_ms']} / {deep['p99_ms']}" if deep else "— (fewer than 50 pages)"
        lines.append(f"| {q['query']} | {q['first']['p50_ms']} / {q['first']['p99_ms']} | {cell} |")
    return "\n".join(lines)
