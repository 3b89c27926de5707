"""Statements on what the upstream calls produced: ``attempts`` (one row per call), and of a
succeeded job its ``results`` row, ``usage``, ``basis_fields`` and one ``citations`` row per
citation. The worker writes them (pcq.jobs.lifecycle.store_outcomes); the API reads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import cast as type_cast

from sqlalchemy import JSON, Row, Subquery, Table, Text, and_, cast, func, insert, null, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
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
            session.execute(insert(type_cast(Table, model.__table__)), rows)


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


# Export rows are plain tuples (an ORM object per row costs ~10x); JSON columns as their text.
_Text = str | None
ExportResult = Row[str, _Text, _Text, _Text, _Text, bool, int | None, int | None, int | None, _Text]
"""job_id, content, parsed (JSON text), model, finish_reason, has usage, prompt, completion and
total tokens, basis (JSON text, on PostgreSQL; else None and the basis is in ExportAnswers.basis)"""
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


def citations_of_tenant(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None,
    batch_id: str | None,
    domain: str | None,
    url: str | None,
    after: int | None,
    limit: int,
) -> Sequence[Row[Citation, str | None, str | None, str | None]]:
    """The tenant's citations, oldest first, filtered; each with its job's ``custom_id`` and its
    basis field's ``reasoning`` and ``confidence``. ``after``: ids above this one."""
    q = (
        select(Citation, Job.custom_id, BasisField.reasoning, BasisField.confidence)
        .join(Job, Job.id == Citation.job_id)
        .join(
            BasisField,
            and_(BasisField.job_id == Citation.job_id, BasisField.position == Citation.field_position),
        )
        .where(Citation.tenant_id == tenant_id)
    )
    if job_id is not None:
        q = q.where(Citation.job_id == job_id)
    if batch_id is not None:
        q = q.where(Citation.batch_id == batch_id)
    if domain is not None:
        q = q.where(Citation.domain == domain)
    if url is not None:
        q = q.where(Citation.url == url)
        if session.get_bind().dialect.name == "postgresql":
            q = q.where(func.md5(Citation.url) == func.md5(url))  # what the index holds
    if after is not None:
        q = q.where(Citation.id > after)
    return session.execute(q.order_by(Citation.id).limit(limit)).all()
