"""What an upstream answer is stored as: the raw body, usage, basis, one row per citation."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, BigIntPK, JSONType, UTCDateTime, utcnow


class Result(Base):
    """Exactly one per succeeded job: the primary key is the job id."""

    __tablename__ = "results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt_number: Mapped[int] = mapped_column(Integer)
    raw_body: Mapped[str] = mapped_column(Text)  # verbatim: JSON, or the SSE text of a stream
    content: Mapped[str | None] = mapped_column(Text, default=None)
    parsed: Mapped[Any | None] = mapped_column(JSONType, default=None)
    model: Mapped[str | None] = mapped_column(String(64), default=None)
    finish_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    upstream_id: Mapped[str | None] = mapped_column(String(128), default=None)
    # The job whose upstream call made this answer, when this job reused it (``"reuse"``, see
    # pcq.jobs.reuse) instead of calling; None for an answer this job's own call made.
    reused_from: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Usage(Base):
    __tablename__ = "usage"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    total_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)


class BasisField(Base):
    __tablename__ = "basis_fields"
    __table_args__ = (UniqueConstraint("job_id", "position"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    field: Mapped[str] = mapped_column(Text)
    reasoning: Mapped[str | None] = mapped_column(Text, default=None)
    confidence: Mapped[str | None] = mapped_column(String(32), default=None)


AUDIT_INCLUDE = ["created_at", "confidence"]


class Citation(Base):
    """One row per citation of one basis field; tenant, batch, the field's confidence and the
    answer's time copied in, so that every audit filter of ``GET /v1/citations`` is one index
    range read in id order (the pages' keyset) instead of a join scanned row by row.

    The field is referenced by (job_id, field_position), not by a surrogate id, so a worker
    can insert the fields and citations of many jobs in two statements without round trips
    for generated keys.

    Each filter's index ends with ``id``: equality on its leading columns leaves the entries
    in id order, so a page (first or deep) reads ``limit`` entries after the cursor. Text that
    can be long (url, field) is indexed by its md5, because a PostgreSQL btree entry holds at
    most 2,704 bytes.
    """

    __tablename__ = "citations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["job_id", "field_position"], ["basis_fields.job_id", "basis_fields.position"], ondelete="CASCADE"
        ),
        Index("ix_citations_job_field_position", "job_id", "field_position", "position", unique=True),
        # INCLUDE (PostgreSQL): a time or confidence filter next to a domain, batch or
        # confidence one is checked in the index entry, not in the row (an index-only scan).
        Index("ix_citations_tenant_domain", "tenant_id", "domain", "id", postgresql_include=AUDIT_INCLUDE),
        # By URL: PostgreSQL indexes the URL's md5, because a btree entry holds at most 2,704
        # bytes and a URL may be longer (one such row failed its whole write batch). SQLite
        # has no such limit and no md5(), so it indexes the URL itself.
        Index("ix_citations_tenant_url", "tenant_id", "url", "id").ddl_if(dialect="sqlite"),
        Index("ix_citations_tenant_url_md5", "tenant_id", func.md5(text("url")), "id").ddl_if(
            dialect="postgresql"
        ),
        Index("ix_citations_tenant_batch", "tenant_id", "batch_id", "id", postgresql_include=AUDIT_INCLUDE),
        # By field: its md5 (a copy the writer computes), as for URLs, but in a column, so that
        # the index can be read without the rows (no index-only scan reads an expression index).
        Index(
            "ix_citations_tenant_field_md5", "tenant_id", "field_md5", "id", postgresql_include=AUDIT_INCLUDE
        ),
        Index(
            "ix_citations_tenant_confidence",
            "tenant_id",
            "confidence",
            "id",
            postgresql_include=["created_at"],
        ),
        Index("ix_citations_tenant_created_at", "tenant_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(String(40), default=None)
    field: Mapped[str] = mapped_column(Text)
    field_position: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(String(255), default=None)
    title: Mapped[str | None] = mapped_column(Text, default=None)
    excerpts: Mapped[list[str] | None] = mapped_column(JSONType, default=None)
    # Copies, written with the row (revision 0008 filled the rows written before it): the
    # basis field's confidence, when the answer was stored (its result's created_at), and the
    # field's md5 (what its index holds: a field name may be longer than a btree entry).
    confidence: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    field_md5: Mapped[str | None] = mapped_column(String(32), default=None)  # md5(field), hex


class BatchDomain(Base):
    """Citations and jobs per domain of one batch (``GET /v1/batches/{id}/domains``), kept by
    the worker in the transaction that stores the citations (pcq.repositories.results).

    Counting them at each request read every citation of the batch: 60-120 ms for a
    20,000-job batch (200,000 citations) even from an index-only scan. A job's citations are
    all stored in one transaction, so adding each transaction's distinct jobs per domain
    counts every job once."""

    __tablename__ = "batch_domains"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)  # "": a URL without a host
    citations: Mapped[int] = mapped_column(BigInteger)
    jobs: Mapped[int] = mapped_column(BigInteger)
