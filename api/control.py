"""What a user can do to a job after submitting it: cancel it, or run a failed one again. In the
caller's transaction (api.service)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from pcq.jobs import outbox
from pcq.jobs.errors import Conflict
from pcq.models import Job, JobStatus, utcnow
from pcq.repositories import jobs as job_rows

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
    changed = job_rows.cancel(session, job.id, now=now)
    if changed == 1:
        outbox.record_finished(session, [(job.id, JobStatus.CANCELLED)], now=now)
    job_rows.reload(session, job)
    if changed != 1 and job.status != JobStatus.CANCELLED:
        raise Conflict(f"job {job.id} already {job.status}; only queued or running jobs can be cancelled")
    return job


def cancel_batch(session: Session, batch_id: str) -> int:
    """Cancel every queued or running job of a batch, as ``cancel`` does one (their running
    calls finish, their outcomes are discarded); returns how many it cancelled."""
    now = utcnow()
    cancelled = job_rows.cancel_active_of_batch(session, batch_id, now=now)
    outbox.record_finished(session, [(job_id, JobStatus.CANCELLED) for job_id in cancelled], now=now)
    return len(cancelled)


def requeue(session: Session, job_ids: list[str]) -> list[str]:
    """Queue failed or cancelled jobs again with a fresh attempt budget; returns those requeued."""
    if not job_ids:
        return []
    requeued = job_rows.requeue(session, job_ids, statuses=RETRYABLE_BY_USER, now=utcnow())
    if requeued:
        outbox.reopen_batches(session, requeued)
    return requeued


def retry(session: Session, job: Job) -> Job:
    if job.status not in RETRYABLE_BY_USER:
        raise Conflict(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    requeue(session, [job.id])
    job_rows.reload(session, job)
    return job


def retry_failed(session: Session, batch_id: str) -> list[str]:
    """Queue the failed jobs of a batch again (only those); returns their ids."""
    return requeue(session, job_rows.failed_of_batch(session, batch_id))
