"""Batches, jobs and the record of every upstream attempt."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, BigIntPK, UTCDateTime, utcnow


class JobStatus(StrEnum):
    """Where a job is in its life; the only place these strings are written."""

    QUEUED = "queued"  # waiting for a claim (a first run, or a retry once next_attempt_at is due)
    RUNNING = "running"  # claimed by a worker under a lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BatchStatus(StrEnum):
    """A batch's status, derived from its jobs' (never stored)."""

    QUEUED = "queued"  # every job is queued
    RUNNING = "running"  # some job has started, not all have ended
    COMPLETED = "completed"  # every job has ended


class Priority(StrEnum):
    """A job's place within its tenant's share of the quota: ``high`` goes first, ``low`` takes
    only what ``normal`` leaves. Stored as its rank (``jobs.priority``), so an index orders it."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return PRIORITY_RANKS[self]

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return PRIORITIES[rank]


PRIORITIES = tuple(Priority)
PRIORITY_RANKS = {p: n for n, p in enumerate(PRIORITIES)}
# The dispatcher's backlog: queued jobs no message was sent for yet (pcq.jobs.dispatch).
UNSENT = text(f"status = '{JobStatus.QUEUED.value}' AND enqueued_at IS NULL")
# Jobs the dispatcher sent that no worker has claimed yet: what the broker holds.
SENT = text(f"status = '{JobStatus.QUEUED.value}' AND enqueued_at IS NOT NULL")
# Queued jobs never retried: due since their submission (the fleet's oldest-job gauge).
QUEUED_FIRST_RUN = text(f"status = '{JobStatus.QUEUED.value}' AND next_attempt_at IS NULL")
# Jobs not ended yet (ACTIVE_STATUSES, spelled out for the index's predicate).
ACTIVE = text(f"status IN ('{JobStatus.QUEUED.value}', '{JobStatus.RUNNING.value}')")
# Jobs an identical request with ``reuse`` may take the answer of, or wait for (pcq.jobs.reuse).
REUSABLE = text(f"status IN ('{JobStatus.RUNNING.value}', '{JobStatus.SUCCEEDED.value}')")

JOB_STATUSES = tuple(JobStatus)
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    total: Mapped[int] = mapped_column(Integer)
    # The submitted JSON text, verbatim (key order, numbers, escapes), never re-serialised.
    metadata_json: Mapped[str | None] = mapped_column("metadata", Text, default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    # The job events also sent to webhook_url: JSON text of a list of event types, or None.
    webhook_events: Mapped[str | None] = mapped_column(Text, default=None)
    # When its batch.completed event was written; cleared when a retry reopens the batch.
    completion_notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A batch created through the OpenAI-compatible API (api.openai_compat) keeps what that API
    # shows: its input file, endpoint and window as given; the JSON text of the errors that
    # failed it at validation (it then has no jobs); and when a cancel was asked for.
    input_file_id: Mapped[str | None] = mapped_column(String(48), default=None)
    endpoint: Mapped[str | None] = mapped_column(String(64), default=None)
    completion_window: Mapped[str | None] = mapped_column(String(16), default=None)
    openai_errors: Mapped[str | None] = mapped_column(Text, default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # Cost (pcq/costs.py), in USD. The estimate is one call per job at the prices of its
    # submission (NULL: submitted before costs were kept). ``max_cost``: no call starts that
    # could take the batch's spend past it; ``spent`` is that spend, kept (as attempts are
    # stored) only for a batch with a max_cost, for the claim's check.
    estimated_cost: Mapped[float | None] = mapped_column(Float, default=None)
    max_cost: Mapped[float | None] = mapped_column(Float, default=None)
    spent: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            f"status IN ({', '.join(repr(s.value) for s in JobStatus)})",
            name="status",
        ),
        UniqueConstraint("tenant_id", "idempotency_key"),
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_jobs_tenant_status_id", "tenant_id", "status", "id"),
        Index("ix_jobs_tenant_custom_id", "tenant_id", "custom_id"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        # The sweeper's two questions: which queued jobs are due, which leases expired.
        Index("ix_jobs_status_next_attempt", "status", "next_attempt_at"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        # The dispatcher's backlog in its order: a tenant's groups (priority, batch), each's
        # oldest first. Partial: it holds only jobs waiting for dispatch, so it stays small.
        Index(
            "ix_jobs_dispatch",
            "tenant_id",
            "priority",
            "batch_id",
            "id",
            "next_attempt_at",
            sqlite_where=UNSENT,
            postgresql_where=UNSENT,
        ),
        # What the broker holds, counted at each dispatch (the sweep's query, which also asks for
        # expired leases, reads the status index instead).
        Index("ix_jobs_sent", "enqueued_at", sqlite_where=SENT, postgresql_where=SENT),
        # The fleet's gauges (pcq.repositories.fleet), each answered in a probe or a few, not by
        # walking the backlog: the oldest queued job never retried (the first entry; retried
        # ones are the first entries of the status index), and the open batches (one probe per
        # batch that has a job not ended).
        Index(
            "ix_jobs_queued_created",
            "created_at",
            sqlite_where=QUEUED_FIRST_RUN,
            postgresql_where=QUEUED_FIRST_RUN,
        ),
        Index("ix_jobs_active_batch", "batch_id", sqlite_where=ACTIVE, postgresql_where=ACTIVE),
        # Reuse (pcq.jobs.reuse): a tenant's running jobs with a given request, and its succeeded
        # ones newest first. Partial: queued and ended-unsuccessful jobs are never asked for.
        Index(
            "ix_jobs_reuse",
            "tenant_id",
            "request_sha256",
            "status",
            "finished_at",
            sqlite_where=REUSABLE,
            postgresql_where=REUSABLE,
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), default=None)
    custom_id: Mapped[str | None] = mapped_column(String(255), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    # The request and metadata exactly as submitted (JSON text): what goes upstream is what
    # came in, byte for byte (jsonb would re-order keys; see api/verbatim.py).
    request_json: Mapped[str] = mapped_column("request", Text)
    # sha256 (hex) of the request text's UTF-8 bytes: finds an identical request to reuse the
    # answer of (pcq.jobs.reuse). Unlike request_hash (idempotency), nothing else goes in it.
    request_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # ``"reuse"``, in seconds: the job takes the answer of an identical request of its tenant
    # that succeeded at most this long ago instead of calling. None: it always calls.
    reuse_seconds: Mapped[int | None] = mapped_column(Integer, default=None)
    model: Mapped[str] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_json: Mapped[str | None] = mapped_column("metadata", Text, default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    priority: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")  # Priority.rank
    # The X-Request-ID of the API request that submitted it: the worker's log lines carry it too.
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts made before the last manual retry: the cap counts attempts since then, while
    # attempt numbers keep growing so every call ever made keeps its own row.
    attempts_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Claims since the last manual retry that died with their worker (their lease expired):
    # counted apart from attempts, so a job that merely shared a dying worker keeps its budget.
    lease_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class Attempt(Base):
    """One row per upstream call, whatever its outcome: the audit trail of what was billed."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
    latency_ms: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))  # ok | retryable | fatal
    error_class: Mapped[str | None] = mapped_column(String(32), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    upstream_request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    # sha256(key)[:16] of the upstream key that carried the call (never the key itself).
    upstream_key_id: Mapped[str | None] = mapped_column(String(16), default=None)
    retry_after_seconds: Mapped[float | None] = mapped_column(default=None)
    error_detail: Mapped[str | None] = mapped_column(Text, default=None)
    # What the call was billed, in USD, at the prices when it was stored (pcq/costs.py): a price
    # changed later does not rewrite it. 0 for a call that got no HTTP answer.
    cost: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
