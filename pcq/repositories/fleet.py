"""The fleet-wide numbers the API's ``/metrics`` exports (api/metrics.py): a few cheap reads
across ``jobs`` and ``webhook_events``, run at most every few seconds per API process.

Each is an aggregate over an index: jobs by status (an index-only scan of a status index,
proportional to the table, the one read that grows with history), the oldest due queued job
(the queued rows only), open batches (the active jobs only), deliveries by status (the status
index of the outbox).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pcq.models import ACTIVE_STATUSES, Job, JobStatus, WebhookEvent


@dataclass(frozen=True)
class FleetGauges:
    jobs: dict[str, int]  # status -> jobs (statuses with none are left out)
    # When the oldest queued job that may run now became due: its retry time, else its
    # submission. None when no queued job is due.
    oldest_due_at: datetime | None
    batches_open: int  # batches with a queued or running job
    deliveries: dict[str, int]  # webhook event status -> events


def read_gauges(session: Session, *, now: datetime) -> FleetGauges:
    jobs = {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    oldest = session.scalar(
        select(func.min(func.coalesce(Job.next_attempt_at, Job.created_at))).where(
            Job.status == JobStatus.QUEUED,
            or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
        )
    )
    batches = session.scalar(
        select(func.count(func.distinct(Job.batch_id))).where(
            Job.status.in_(ACTIVE_STATUSES), Job.batch_id.is_not(None)
        )
    )
    deliveries = {
        status: n
        for status, n in session.execute(
            select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
        )
    }
    return FleetGauges(jobs, oldest, int(batches or 0), deliveries)
