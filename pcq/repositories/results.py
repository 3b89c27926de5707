"""Statements on what the upstream calls produced: ``attempts`` (one row per call), and of a
succeeded job its ``results`` row, ``usage``, ``basis_fields`` and one ``citations`` row per
citation. The worker writes them (pcq.jobs.lifecycle.store_outcomes); the API reads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, Row, Table, and_, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pcq.models import Attempt, BasisField, Citation, Job, Result, Usage
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
    INSERT per table (cheaper than the ORM's bulk insert)."""
    postgres = session.get_bind().dialect.name == "postgresql"
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
            session.execute(insert(cast(Table, model.__table__)), rows)


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
) -> Sequence[Row[Citation, str | None, str | None, str | None]]:
    """The tenant's citations, oldest first, filtered; each with its job's ``custom_id`` and its
    basis field's ``reasoning`` and ``confidence``. ``after``: ids above this one.

    Each filter has an index ending with ``id`` (pcq.models.result.Citation), so a page reads
    about ``limit`` entries wherever the cursor is; a long text (url, field) is also compared
    by md5 on PostgreSQL, which is what its index holds."""
    postgres = session.get_bind().dialect.name == "postgresql"
    q = (
        select(Citation, Job.custom_id, BasisField.reasoning, BasisField.confidence)
        .join(Job, Job.id == Citation.job_id)
        .join(
            BasisField,
            and_(BasisField.job_id == Citation.job_id, BasisField.position == Citation.field_position),
        )
        .where(Citation.tenant_id == tenant_id)
    )
    if where.job_id is not None:
        q = q.where(Citation.job_id == where.job_id)
    if where.batch_id is not None:
        q = q.where(Citation.batch_id == where.batch_id)
    if where.custom_id is not None:
        q = q.where(Job.tenant_id == tenant_id, Job.custom_id == where.custom_id)
    if where.domain is not None:
        q = q.where(Citation.domain == where.domain)
    for column, value in ((Citation.url, where.url), (Citation.field, where.field)):
        if value is not None:
            q = q.where(column == value)
            if postgres:
                q = q.where(func.md5(column) == func.md5(value))
    if where.confidence is not None:
        q = q.where(Citation.confidence == where.confidence)
    if where.created_after is not None:
        q = q.where(Citation.created_at > where.created_after)
    if where.created_before is not None:
        q = q.where(Citation.created_at < where.created_before)
    if after is not None:
        q = q.where(Citation.id > after)
    return session.execute(q.order_by(Citation.id).limit(limit)).all()


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
    last row of the previous page.

    Counted afresh on each call, from ``ix_citations_batch_domain_job``: an index-only scan
    of the batch's entries, in (domain, job) order, grouped twice without a sort (per domain
    and job, then per domain), so ``jobs`` needs no DISTINCT."""
    per_job = (
        select(Citation.domain, Citation.job_id, func.count().label("n"))
        .where(Citation.batch_id == batch_id)
        .group_by(Citation.domain, Citation.job_id)
        .subquery()
    )
    citations = func.sum(per_job.c.n)
    key = func.coalesce(per_job.c.domain, "")
    q = select(per_job.c.domain, citations, func.count()).group_by(per_job.c.domain)
    if after is not None:
        q = q.having(or_(citations < after[0], and_(citations == after[0], key > after[1])))
    rows = session.execute(q.order_by(citations.desc(), key).limit(limit)).all()
    return [DomainCount(domain, int(n), int(jobs)) for domain, n, jobs in rows]
