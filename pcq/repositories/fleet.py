"""The fleet-wide numbers the API's ``/metrics`` exports (api/metrics.py), read by each API
process's refresher thread every few seconds. Each read must stay cheap however large the
tables grow, and never run long:

- ``read_active`` (every refresh) touches only what is not ended: queued and running jobs
  counted over their ranges of the status indexes, the oldest due queued job in two index
  probes (``ix_jobs_queued_created``'s first entry, and the first retried one in
  ``ix_jobs_status_next_attempt``), the open batches one probe each (a skip scan of
  ``ix_jobs_active_batch``), the pending deliveries over their range of the outbox's status
  index.
- ``read_totals`` (less often) counts the ended jobs and deliveries by status: an index range
  as long as the history, the one read that grows with it.

Both set a ``statement_timeout`` on PostgreSQL, so a slow read fails instead of piling up.
The predicates are literals, not bound parameters: a prepared statement's generic plan could
not match them to the partial indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, literal_column, select, text
from sqlalchemy.orm import Session

from pcq.models import Job, JobStatus, WebhookEvent
from pcq.models.delivery import DeliveryStatus
from pcq.models.job import ACTIVE, QUEUED_FIRST_RUN, TERMINAL_STATUSES

STATEMENT_TIMEOUT = "2s"
TERMINAL_DELIVERIES = (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.DISABLED)


@dataclass(frozen=True)
class ActiveGauges:
    jobs: dict[str, int]  # queued and running -> jobs
    # When the oldest queued job that may run now became due: its retry time, else its
    # submission. None when no queued job is due.
    oldest_due_at: datetime | None
    batches_open: int  # batches with a queued or running job
    deliveries: dict[str, int]  # pending -> events


@dataclass(frozen=True)
class Totals:
    jobs: dict[str, int]  # ended job status -> jobs (statuses with none are left out)
    deliveries: dict[str, int]  # settled event status -> events (likewise)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(_literal(v) for v in values) + ")"


def _limit_time(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"))


def _count(session: Session, model: type[Job] | type[WebhookEvent], status: str) -> int:
    counted = select(func.count()).select_from(model).where(text(f"status = {_literal(status)}"))
    return int(session.scalar(counted) or 0)


def _batches_open(session: Session) -> int:
    """Distinct batches of the active jobs, stepping through ``ix_jobs_active_batch`` from one
    batch to the next (a recursive CTE: PostgreSQL 15 has no skip scan of its own)."""
    seed = select(func.min(Job.batch_id).label("batch_id")).where(ACTIVE).cte("open_batches", recursive=True)
    following = select(func.min(Job.batch_id)).where(ACTIVE, Job.batch_id > seed.c.batch_id).scalar_subquery()
    steps = seed.union_all(select(following).where(seed.c.batch_id.is_not(None)))
    return int(session.scalar(select(func.count(steps.c.batch_id))) or 0)


def read_active(session: Session, *, now: datetime) -> ActiveGauges:
    _limit_time(session)
    jobs = {s.value: _count(session, Job, s.value) for s in (JobStatus.QUEUED, JobStatus.RUNNING)}
    never_retried = session.scalar(select(func.min(Job.created_at)).where(QUEUED_FIRST_RUN))
    retried = session.scalar(
        select(func.min(Job.next_attempt_at)).where(
            text(f"status = {_literal(JobStatus.QUEUED.value)}"), Job.next_attempt_at <= now
        )
    )
    due = [t for t in (never_retried, retried) if t is not None]
    pending = DeliveryStatus.PENDING.value
    return ActiveGauges(
        jobs,
        min(due) if due else None,
        _batches_open(session),
        {pending: _count(session, WebhookEvent, pending)},
    )


def read_totals(session: Session) -> Totals:
    _limit_time(session)

    def by_status(model: type[Job] | type[WebhookEvent], statuses: tuple[str, ...]) -> dict[str, int]:
        status: ColumnElement[str] = literal_column("status")
        where = text(f"status IN {_in(statuses)}")
        rows = session.execute(select(status, func.count()).select_from(model).where(where).group_by(status))
        return {str(s): int(n) for s, n in rows}

    return Totals(
        by_status(Job, tuple(s.value for s in TERMINAL_STATUSES)),
        by_status(WebhookEvent, tuple(s.value for s in TERMINAL_DELIVERIES)),
    )
