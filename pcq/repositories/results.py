"""Statements on what the upstream calls produced: ``attempts`` (one row per call), and of a
succeeded job its ``results`` row, ``usage``, ``basis_fields`` and one ``citations`` row per
citation. The worker writes them (pcq.jobs.lifecycle.store_outcomes); the API reads them."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from typing import cast as type_cast

from sqlalchemy import (
    JSON,
    ColumnElement,
    Row,
    Select,
    String,
    Subquery,
    Table,
    Text,
    and_,
    cast,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from pcq.models import Attempt, BasisField, Batch, BatchDomain, Citation, Job, Result, Usage
from pcq.models.base import UTCDateTime
from pcq.repositories.bulk import copy_rows

# --- writes (the worker)


def insert_attempts(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert attempt rows, skipping any (job, number) already recorded.

    A number can only repeat if the database lost a committed claim (a failover to a lagging
    replica); one such row must not fail the other outcomes of the batch.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg = postgresql.insert(Attempt).on_conflict_do_nothing(index_elements=["job_id", "number"])
        session.execute(pg, rows)
    elif dialect == "sqlite":
        lite = sqlite.insert(Attempt).on_conflict_do_nothing(index_elements=["job_id", "number"])
        session.execute(lite, rows)
    else:
        session.execute(insert(Attempt), rows)


def insert_answers(
    session: Session,
    *,
    results: list[dict[str, Any]],
    usage: list[dict[str, Any]],
    basis: list[dict[str, Any]],
    citations: list[dict[str, Any]],
) -> None:
    """Insert the rows of succeeded jobs, given as column dicts: COPY on PostgreSQL (the answer
    rows are most of a worker's writing: 13 rows per job in the benchmarks), else one Core
    INSERT per table (cheaper than the ORM's bulk insert). Each citation dict gets its field's
    md5 here (``field_md5``, what the field index holds), from the field as it is stored."""
    postgres = session.get_bind().dialect.name == "postgresql"
    md5s: dict[str, str] = {}  # a job's fields are few and repeat in each of its citations
    for c in citations:
        field = c["field"]
        c["field_md5"] = md5s.get(field) or md5s.setdefault(field, text_md5(field))
    for model, rows in ((Result, results), (Usage, usage), (BasisField, basis), (Citation, citations)):
        if not rows:
            continue
        if postgres:
            columns = list(rows[0])
            json_cols = {c.name for c in model.__table__.columns if isinstance(c.type, JSON)}
            copy_rows(
                session, model.__tablename__, columns, [[r[c] for c in columns] for r in rows], json_cols
            )
        else:
            session.execute(insert(type_cast(Table, model.__table__)), rows)
    _count_domains(session, citations)


def _count_domains(session: Session, citations: list[dict[str, Any]]) -> None:
    """Add these citations to their batches' counts per domain (``batch_domains``).

    The last statement of the worker's write transaction: rows of a busy domain are shared by
    every writer of the batch, and each holds them until its commit. The rows are upserted in
    key order, so two writers take them in the same order and never deadlock."""
    cites: Counter[tuple[str, str]] = Counter()
    jobs: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
    for c in citations:
        if c["batch_id"] is not None:
            key = (c["batch_id"], c["domain"] or "")
            cites[key] += 1
            jobs[key].add(c["job_id"])
    if not cites:
        return
    rows = [
        {"batch_id": b, "domain": d, "citations": n, "jobs": len(jobs[b, d])}
        for (b, d), n in sorted(cites.items())
    ]
    dialect = session.get_bind().dialect.name
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(BatchDomain)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["batch_id", "domain"],
            set_={
                "citations": BatchDomain.citations + stmt.excluded.citations,
                "jobs": BatchDomain.jobs + stmt.excluded.jobs,
            },
        ),
        rows,
    )


def copy_answers(session: Session, pairs: list[tuple[str, str]], *, now: datetime) -> None:
    """Store, for each (job id, origin job id), a copy of the origin's answer as the job's own,
    stored ``now``: its result (``reused_from`` the origin), usage, basis fields and citations
    (under the job's tenant and batch), and its batch's counts per domain. Five INSERT ...
    SELECT statements, whatever the number of jobs; the rows never pass through Python."""
    if not pairs:
        return
    given = union_all(
        *(
            select(
                cast(literal(job_id), String(40)).label("job_id"),
                cast(literal(origin), String(40)).label("origin"),
            )
            for job_id, origin in pairs
        )
    ).subquery("given")
    copied = ["attempt_number", "raw_body", "content", "parsed", "model", "finish_reason", "upstream_id"]
    source = Result.__table__.alias("source")
    session.execute(
        insert(Result.__table__).from_select(  # type: ignore[arg-type]
            ["job_id", "reused_from", "created_at", *copied],
            select(
                given.c.job_id, given.c.origin, literal(now, UTCDateTime()), *(source.c[c] for c in copied)
            ).join(source, source.c.job_id == given.c.origin),
        )
    )
    job_ids = [job_id for job_id, _ in pairs]
    copy = Result.__table__.alias("copy")
    mine = copy.c.job_id.in_(job_ids)
    usage_cols = ["prompt_tokens", "completion_tokens", "total_tokens", "details"]
    session.execute(
        insert(Usage.__table__).from_select(  # type: ignore[arg-type]
            ["job_id", *usage_cols],
            select(copy.c.job_id, *(Usage.__table__.c[c] for c in usage_cols))
            .join(Usage.__table__, Usage.__table__.c.job_id == copy.c.reused_from)
            .where(mine),
        )
    )
    basis_cols = ["position", "field", "reasoning", "confidence"]
    session.execute(
        insert(BasisField.__table__).from_select(  # type: ignore[arg-type]
            ["job_id", *basis_cols],
            select(copy.c.job_id, *(BasisField.__table__.c[c] for c in basis_cols))
            .join(BasisField.__table__, BasisField.__table__.c.job_id == copy.c.reused_from)
            .where(mine),
        )
    )
    cites = Citation.__table__
    cite_cols = [
        "field",
        "field_position",
        "position",
        "url",
        "domain",
        "title",
        "excerpts",
        "confidence",
        "field_md5",
    ]
    session.execute(
        insert(cites).from_select(  # type: ignore[arg-type]
            ["tenant_id", "job_id", "batch_id", "created_at", *cite_cols],
            select(
                Job.tenant_id,
                Job.id,
                Job.batch_id,
                literal(now, UTCDateTime()),
                *(cites.c[c] for c in cite_cols),
            )
            .join(copy, copy.c.job_id == Job.id)
            .join(cites, cites.c.job_id == copy.c.reused_from)
            .where(mine)
            .order_by(Job.id, cites.c.field_position, cites.c.position),
        )
    )
    _count_copied_domains(session, job_ids)


def _count_copied_domains(session: Session, job_ids: list[str]) -> None:
    """Add the citations just copied for these jobs to their batches' counts per domain, as
    ``_count_domains`` does for a call's (rows upserted in key order)."""
    domain = func.coalesce(Citation.domain, literal_column("''"))
    counted = (
        select(
            Citation.batch_id,
            domain.label("domain"),
            func.count().label("citations"),
            func.count(Citation.job_id.distinct()).label("jobs"),
        )
        .where(Citation.job_id.in_(job_ids), Citation.batch_id.is_not(None))
        .group_by(Citation.batch_id, domain)
        .order_by(Citation.batch_id, domain)
    )
    dialect = session.get_bind().dialect.name
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(BatchDomain)
    session.execute(
        stmt.from_select(["batch_id", "domain", "citations", "jobs"], counted).on_conflict_do_update(
            index_elements=["batch_id", "domain"],
            set_={
                "citations": BatchDomain.citations + stmt.excluded.citations,
                "jobs": BatchDomain.jobs + stmt.excluded.jobs,
            },
        )
    )


def text_md5(text: str) -> str:
    """PostgreSQL's ``md5(text)``: the hex md5 of the UTF-8 bytes."""
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


# --- reads (the API)


@dataclass
class Answers:
    """The stored answers of some jobs: results and usage by job id; basis fields and citations
    ordered by job, then position (a citation's field is its ``field_position``)."""

    results: dict[str, Result]
    usage: dict[str, Usage]
    basis: list[BasisField]
    citations: list[Citation]


def answers_of(session: Session, job_ids: Sequence[str]) -> Answers:
    """Results, usage, basis and citations of many jobs in four queries (none for no jobs)."""
    if not job_ids:
        return Answers({}, {}, [], [])
    results = {r.job_id: r for r in session.scalars(select(Result).where(Result.job_id.in_(job_ids)))}
    usage = {u.job_id: u for u in session.scalars(select(Usage).where(Usage.job_id.in_(job_ids)))}
    citations = list(
        session.scalars(
            select(Citation)
            .where(Citation.job_id.in_(job_ids))
            .order_by(Citation.job_id, Citation.field_position, Citation.position)
        )
    )
    basis = list(
        session.scalars(
            select(BasisField)
            .where(BasisField.job_id.in_(job_ids))
            .order_by(BasisField.job_id, BasisField.position)
        )
    )
    return Answers(results, usage, basis, citations)


def attempts_of(session: Session, job_id: str) -> list[Attempt]:
    """Every upstream call of a job, in the order they were made."""
    return list(session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))


# Export rows are plain tuples (an ORM object per row costs ~10x); JSON columns as their text.
_Text = str | None
ExportResult = Row[str, _Text, _Text, _Text, _Text, bool, int | None, int | None, int | None, _Text, _Text]
"""job_id, content, parsed (JSON text), model, finish_reason, has usage, prompt, completion and
total tokens, reused_from, basis (JSON text, on PostgreSQL; else None and the basis is in
ExportAnswers.basis)"""
ExportBasis = Row[str, int, str, str | None, str | None]
"""job_id, position, field, reasoning, confidence"""
ExportCitation = Row[str, int, str, str | None, str | None]
"""job_id, field_position, url, title, excerpts (JSON text)"""


@dataclass
class ExportAnswers:
    """The answers of a page of exported jobs, ordered by job: results, and (other than on
    PostgreSQL, where each result carries its basis as JSON) basis fields and citations, ordered
    by job then position (a citation's field is its ``field_position``)."""

    results: Sequence[ExportResult]
    basis: Sequence[ExportBasis] = ()
    citations: Sequence[ExportCitation] = ()


def export_answers(session: Session, batch_id: str, first: str, last: str) -> ExportAnswers:
    """The answers of a batch's jobs whose ids are in ``first..last`` (a page of its export).

    Every query reads one index range in key order: no IN list of ids to hash and sort (a
    third of PostgreSQL's time for a page of 1,000 jobs, measured). The range may hold jobs of
    another batch submitted at the same moment (ids are time-ordered): citations carry their
    batch and are filtered here; the results and basis fields of such jobs are for the caller
    to skip (it knows the page's job ids).

    On PostgreSQL, one query: each result with its usage and its basis (fields, then their
    citations, in order) as JSON text, built by the server (``json_agg``), so the API process
    makes no Python object per citation (their allocation, and the cyclic garbage collector
    it wakes, were half of an export's CPU). Elsewhere, three queries: results with usage,
    basis fields, citations.
    """
    conn = session.connection()
    in_range = and_(Result.job_id >= first, Result.job_id <= last)
    columns = [
        Result.job_id,
        Result.content,
        cast(Result.parsed, Text),
        Result.model,
        Result.finish_reason,
        Usage.job_id.is_not(None),
        Usage.prompt_tokens,
        Usage.completion_tokens,
        Usage.total_tokens,
        Result.reused_from,
    ]
    if conn.dialect.name == "postgresql":
        basis_json = _basis_json(batch_id, first, last)
        rows = conn.execute(
            select(*columns, cast(func.coalesce(basis_json.c.json, text("'[]'::json")), Text))
            .outerjoin(Usage, Usage.job_id == Result.job_id)
            .outerjoin(basis_json, basis_json.c.job_id == Result.job_id)
            .where(in_range)
            .order_by(Result.job_id)
        ).all()
        # The columns above, in ExportResult's order (a list of columns loses their types).
        return ExportAnswers(type_cast(Sequence[ExportResult], rows))
    rows = conn.execute(
        select(*columns, null())
        .outerjoin(Usage, Usage.job_id == Result.job_id)
        .where(in_range)
        .order_by(Result.job_id)
    ).all()
    results = type_cast(Sequence[ExportResult], rows)
    basis = conn.execute(
        select(
            BasisField.job_id,
            BasisField.position,
            BasisField.field,
            BasisField.reasoning,
            BasisField.confidence,
        )
        .where(BasisField.job_id >= first, BasisField.job_id <= last)
        .order_by(BasisField.job_id, BasisField.position)
    ).all()
    citations = conn.execute(
        select(
            Citation.job_id,
            Citation.field_position,
            Citation.url,
            Citation.title,
            cast(Citation.excerpts, Text),
        )
        .where(Citation.job_id >= first, Citation.job_id <= last, Citation.batch_id == batch_id)
        .order_by(Citation.job_id, Citation.field_position, Citation.position)
    ).all()
    return ExportAnswers(results, basis, citations)


def _basis_json(batch_id: str, first: str, last: str) -> Subquery:
    """PostgreSQL: (job_id, basis) for the jobs in ``first..last``, ``basis`` being the JSON
    array ResultOut.basis shows: ``[{"field", "reasoning", "confidence", "citations": [{"url",
    "title", "excerpts"}]}]``, fields and citations by position."""
    cites = (
        select(
            Citation.job_id,
            Citation.field_position,
            func.json_agg(
                aggregate_order_by(
                    func.json_build_object(
                        "url", Citation.url, "title", Citation.title, "excerpts", Citation.excerpts
                    ),
                    Citation.position,
                )
            ).label("citations"),
        )
        .where(Citation.job_id >= first, Citation.job_id <= last, Citation.batch_id == batch_id)
        .group_by(Citation.job_id, Citation.field_position)
        .subquery()
    )
    entry = func.json_build_object(
        "field",
        BasisField.field,
        "reasoning",
        BasisField.reasoning,
        "confidence",
        BasisField.confidence,
        "citations",
        func.coalesce(cites.c.citations, text("'[]'::json")),
    )
    return (
        select(BasisField.job_id, func.json_agg(aggregate_order_by(entry, BasisField.position)).label("json"))
        .outerjoin(
            cites, and_(cites.c.job_id == BasisField.job_id, cites.c.field_position == BasisField.position)
        )
        .where(BasisField.job_id >= first, BasisField.job_id <= last)
        .group_by(BasisField.job_id)
        .subquery()
    )


@dataclass(frozen=True)
class CitationFilter:
    """What ``GET /v1/citations`` narrows to; every given filter must hold (AND).

    ``custom_id`` is the job's (unique within a batch, so it may name jobs of several
    batches); ``confidence`` is the basis field's; ``created_after`` and ``created_before``
    bound (exclusively) when the answer was stored."""

    job_id: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    domain: str | None = None
    url: str | None = None
    field: str | None = None
    confidence: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def citations_of_tenant(
    session: Session, tenant_id: str, where: CitationFilter, *, after: int | None, limit: int
) -> list[Row[Citation, str | None, str | None, str | None]]:
    """The tenant's citations, oldest first, filtered; each with its job's ``custom_id`` and its
    basis field's ``reasoning`` and ``confidence``. ``after``: ids above this one.

    Two steps: the page's ids from the index of one filter (``_page_ids``), then those rows
    with their job and basis field. A url or field is matched by its md5 in the first step
    (what the index holds) and exactly in the second; should two texts share an md5, the rows
    the second step drops are made up from the ids after them."""
    exact = [Citation.url == where.url] if where.url is not None else []
    exact += [Citation.field == where.field] if where.field is not None else []
    rows: list[Row[Citation, str | None, str | None, str | None]] = []
    while True:
        ids = list(session.scalars(_page_ids(session, tenant_id, where, after=after, limit=limit)))
        if ids:
            q = (
                select(Citation, Job.custom_id, BasisField.reasoning, BasisField.confidence)
                .join(Job, Job.id == Citation.job_id)
                .join(
                    BasisField,
                    and_(
                        BasisField.job_id == Citation.job_id, BasisField.position == Citation.field_position
                    ),
                )
                .where(Citation.id.in_(ids), *exact)
            )
            rows += session.execute(q.order_by(Citation.id)).all()
        if len(rows) >= limit or len(ids) < limit:
            return rows[:limit]
        after = ids[-1]


def _page_ids(
    session: Session, tenant_id: str, where: CitationFilter, *, after: int | None, limit: int
) -> Select[Any]:
    """The ids of a page, read from the index of one filter (the "driver").

    Each filter's index ends with ``id`` (pcq.models.result.Citation): with its leading columns
    fixed, its entries are in id order, so a page reads about ``limit`` of them wherever the
    cursor is. Left to itself, PostgreSQL's planner often prefers the primary key instead (scan
    every id in order, filter, stop after ``limit``) because it assumes the matching rows are
    spread evenly; they are not when they are one batch's or one day's: 0.1 s to skip 900,000
    rows before the first match in the benchmark. So the driver's equality is written as a
    range (``x >= v AND x <= v``, the same rows) and the ids ordered by (driver, id): only the
    driver's index yields that order, the primary key cannot. A time window alone is read in
    id order if it holds most of the tenant's rows, else from its own index and the matches
    sorted (``id + 0`` keeps the primary key out): see ``_mostly_inside``.

    A job's (or a custom_id's) citations are few: any index will do. A url or field is
    compared by md5 (the url's on PostgreSQL, the field's copy everywhere), which is what its
    index holds; the caller compares the text itself.
    """
    postgres = session.get_bind().dialect.name == "postgresql"
    q = select(Citation.id).where(Citation.tenant_id == tenant_id)
    order: list[ColumnElement[Any]] = []
    if where.job_id is not None:
        q = q.where(Citation.job_id == where.job_id)
    if where.custom_id is not None:
        jobs = select(Job.id).where(Job.tenant_id == tenant_id, Job.custom_id == where.custom_id)
        q = q.where(Citation.job_id.in_(jobs))
    # (indexed expression, value): the driver's candidates in turn. A url or field only by its
    # md5 here, so that the index is read alone; the caller compares the text.
    url_md5 = text_md5(where.url) if where.url is not None else None
    keyed: list[tuple[Any, Any]] = [
        (func.md5(Citation.url), url_md5) if postgres else (Citation.url, where.url),
        (Citation.field_md5, text_md5(where.field) if where.field is not None else None),
        (Citation.batch_id, where.batch_id),
        (Citation.domain, where.domain),
        (Citation.confidence, where.confidence),
    ]
    given = [(key, value) for key, value in keyed if value is not None]
    by_job = where.job_id is not None or where.custom_id is not None
    drives = bool(given) and not by_job
    for i, (key, value) in enumerate(given):
        if drives and i == 0:
            # Only as a range: an equality would let the planner drop the driver from the order
            # (it is constant), and the primary key would yield the order again.
            q = q.where(key >= value, key <= value)
            order.append(key)
        else:
            q = q.where(key == value)
    if where.created_after is not None:
        q = q.where(Citation.created_at > where.created_after)
    if where.created_before is not None:
        q = q.where(Citation.created_at < where.created_before)
    if after is not None:
        q = q.where(Citation.id > after)
    if not drives and not by_job and (where.created_after is not None or where.created_before is not None):
        if not _mostly_inside(session, tenant_id, where.created_after, where.created_before):
            return q.order_by(Citation.id + 0).limit(limit)
    return q.order_by(*order, Citation.id).limit(limit)


WINDOW_PROBE = 10_000  # index entries counted, at most, on each side of a time window


def _mostly_inside(session: Session, tenant_id: str, after: datetime | None, before: datetime | None) -> bool:
    """Whether a time window holds most of the tenant's citations: at least WINDOW_PROBE of them,
    and fewer than that outside it. Then its matches are dense in id order and the page is read
    in id order (the primary key); otherwise the window's entries are read from its index and
    sorted, which costs as many entries as the window holds. Two counts, each of at most
    WINDOW_PROBE entries of ``ix_citations_tenant_created_at`` (index-only)."""
    inside = [Citation.created_at > after] if after is not None else []
    inside += [Citation.created_at < before] if before is not None else []
    outside = [Citation.created_at <= after] if after is not None else []
    outside += [Citation.created_at >= before] if before is not None else []

    def count(condition: ColumnElement[bool]) -> int:
        probe = select(Citation.id).where(Citation.tenant_id == tenant_id, condition).limit(WINDOW_PROBE)
        return session.execute(select(func.count()).select_from(probe.subquery())).scalar_one()

    return count(and_(*inside)) >= WINDOW_PROBE and count(or_(*outside)) < WINDOW_PROBE


@dataclass(frozen=True)
class DomainCount:
    domain: str | None  # None: citations whose URL names no host
    citations: int
    jobs: int


def domains_of_batch(
    session: Session, batch_id: str, *, after: tuple[int, str] | None, limit: int
) -> list[DomainCount]:
    """The domains a batch's citations name: citations and distinct jobs per domain, most cited
    first, ties by domain (no host sorts as ""). ``after``: the (citations, domain) of the
    last row of the previous page. Read from the counts the worker keeps (``batch_domains``):
    one row per domain, whatever the batch's size."""
    q = select(BatchDomain.domain, BatchDomain.citations, BatchDomain.jobs).where(
        BatchDomain.batch_id == batch_id
    )
    if after is not None:
        n, domain = after
        q = q.where(
            or_(BatchDomain.citations < n, and_(BatchDomain.citations == n, BatchDomain.domain > domain))
        )
    rows = session.execute(q.order_by(BatchDomain.citations.desc(), BatchDomain.domain).limit(limit)).all()
    return [DomainCount(domain or None, n, jobs) for domain, n, jobs in rows]


def domains_of_tenant(session: Session, tenant_id: str, *, limit: int) -> list[DomainCount]:
    """The domains a tenant's citations name, most cited first (ties by domain), at most
    ``limit``: citations and distinct jobs per domain. A batch's counts are read from
    ``batch_domains`` (one row per batch and domain, not per citation); the citations of jobs
    outside any batch, which that table does not count, are counted from their rows (a range of
    ``ix_citations_tenant_batch``). A job is in one batch at most, so adding the batches' job
    counts counts each job once."""
    batched = (
        select(
            BatchDomain.domain.label("domain"),
            BatchDomain.citations.label("citations"),
            BatchDomain.jobs.label("jobs"),
        )
        .join(Batch, Batch.id == BatchDomain.batch_id)
        .where(Batch.tenant_id == tenant_id)
    )
    # "" inline, not a parameter: PostgreSQL matches a GROUP BY expression to the select list's
    # by its text, and two parameters are two texts.
    host = func.coalesce(Citation.domain, literal_column("''"))
    loose = (
        select(
            host.label("domain"),
            func.count().label("citations"),
            func.count(Citation.job_id.distinct()).label("jobs"),
        )
        .where(Citation.tenant_id == tenant_id, Citation.batch_id.is_(None))
        .group_by(host)
    )
    both = union_all(batched, loose).subquery()
    n = func.sum(both.c.citations)
    q = (
        select(both.c.domain, n, func.sum(both.c.jobs))
        .group_by(both.c.domain)
        .order_by(n.desc(), both.c.domain)
        .limit(limit)
    )
    return [DomainCount(domain or None, int(c), int(j)) for domain, c, j in session.execute(q)]
