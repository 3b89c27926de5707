"""One-job shorthands for tests, built on the production paths the worker takes.

The worker claims many jobs per statement (``lifecycle.claim_many``) and stores many outcomes
per transaction (``lifecycle.store_outcomes``); tests often want one. These wrappers only pick
the first of a list, so what a test exercises is exactly what production runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from api.intake import NewJob
from pcq.jobs.lifecycle import AttemptRecord, ClaimedJob, Settled, claim_many, store_outcomes
from pcq.models import JobStatus, Priority
from pcq.settings import load_settings
from pcq.wire import ParsedCompletion


def claim(
    session: Session, job_id: str, *, now: datetime, lease_seconds: float, max_attempts: int
) -> ClaimedJob | None:
    """Take one job for one attempt, or None if it is not ours to run."""
    jobs = claim_many(
        session,
        [job_id],
        now=now,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        prices=load_settings({}).prices,
    )
    return jobs.jobs[0] if jobs.jobs else None


def store_success(
    session: Session, job: ClaimedJob, record: AttemptRecord, completion: ParsedCompletion
) -> bool:
    """One job's success; False (only the attempt is recorded) if the claim was lost."""
    return job.id in store_outcomes(session, [Settled(job, record, completion=completion)], max_attempts=1)


def store_retry(
    session: Session,
    job: ClaimedJob,
    record: AttemptRecord,
    *,
    next_attempt_at: datetime,
    max_attempts: int,
    code: str,
    error: str,
) -> str:
    """Record a retryable failure; schedule the next attempt or fail for good."""
    store_outcomes(
        session,
        [Settled(job, record, retry_at=next_attempt_at, code=code, error=error)],
        max_attempts=max_attempts,
    )
    return JobStatus.FAILED if job.exhausted(max_attempts) else JobStatus.QUEUED


def store_failure(session: Session, job: ClaimedJob, record: AttemptRecord, *, code: str, error: str) -> None:
    store_outcomes(session, [Settled(job, record, code=code, error=error)], max_attempts=1)


@dataclass
class BatchBody:
    """A batch body (api.intake.BatchSource) of NewJob items, as api.batch_input reads one."""

    items: list[NewJob]
    metadata_json: str | None = None
    webhook_url: str | None = None
    webhook_events: str | None = None
    priority: Priority | None = None
    max_cost: float | None = None
    reuse_seconds: int | None = None

    def jobs(self) -> Iterator[NewJob]:
        yield from self.items
