"""What a user can do to a job after submitting it: cancel it, or run a failed one again."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pcq.jobs.errors import Conflict
from pcq.models import ACTIVE_STATUSES, Job, JobStatus, utcnow

RETRYABLE_BY_USER = (JobStatus.FAILED, JobStatus.CANCELLED)


def cancel(session: Session, job: Job) -> Job:
    """Cancel a queued or running job.

    A queued job never calls the upstream (its claim needs ``queued``). A running call is
    left to finish, but its outcome is discarded: every worker write is guarded by
    ``status='running'``, which cancel has changed. Cancelling twice is harmless.
    """
    if job.status == JobStatus.CANCELLED:
        return job
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_STATUSES))
        .values(
            status=JobStatus.CANCELLED,
            lease_until=None,
            next_attempt_at=None,
            finished_at=now,
            updated_at=now,
            error_code="cancelled",
            error="cancelled by the user",
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    if res.rowcount != 1 and job.status != JobStatus.CANCELLED:  # type: ignore[attr-defined]
        raise Conflict(f"job {job.id} already {job.status}; only queued or running jobs can be cancelled")
    return job


def requeue(session: Session, job_ids: list[str]) -> list[str]:
    """Queue failed or cancelled jobs again with a fresh attempt budget; returns those requeued."""
    if not job_ids:
        return []
    now = utcnow()
    requeued = list(
        session.scalars(
            select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(RETRYABLE_BY_USER)).with_for_update()
        )
    )
    if requeued:
        session.execute(
            update(Job)
            .where(Job.id.in_(requeued), Job.status.in_(RETRYABLE_BY_USER))
            .values(
                status=JobStatus.QUEUED,
                attempts_base=Job.attempts,
                lease_losses=0,
                error=None,
                error_code=None,
                next_attempt_at=None,
                lease_until=None,
                finished_at=None,
                enqueued_at=now,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    return requeued


def retry(session: Session, job: Job) -> Job:
    if job.status not in RETRYABLE_BY_USER:
        raise Conflict(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    requeue(session, [job.id])
    session.refresh(job)
    return job


def failed_job_ids(session: Session, batch_id: str) -> list[str]:
    return list(
        session.scalars(select(Job.id).where(Job.batch_id == batch_id, Job.status == JobStatus.FAILED))
    )
