"""The worker's side of a job: claim with a lease, store the outcome exactly once, sweep.

Every write here is guarded by ``status='running' AND attempts=<the claimed attempt>``: a
second copy of a task, or a run whose lease was taken over, cannot store a result or move
the job, because a newer claim has bumped ``attempts`` (or the job left ``running``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from pcq.models import Attempt, BasisField, Citation, Job, Result, Usage
from pcq.wire import ParsedCompletion


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    tenant_id: str
    batch_id: str | None
    attempt: int
    request: dict[str, Any]
    attempts_base: int = 0

    def exhausted(self, max_attempts: int) -> bool:
        return self.attempt - self.attempts_base >= max_attempts


@dataclass(frozen=True)
class AttemptRecord:
    """What one upstream call did, whatever its outcome."""

    number: int
    started_at: datetime
    finished_at: datetime
    outcome: str  # ok | retryable | fatal
    error_class: str | None = None
    status_code: int | None = None
    upstream_request_id: str | None = None
    retry_after_seconds: float | None = None
    error_detail: str | None = None

    def row(self, job_id: str) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "number": self.number,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "latency_ms": int((self.finished_at - self.started_at).total_seconds() * 1000),
            "outcome": self.outcome,
            "error_class": self.error_class,
            "status_code": self.status_code,
            "upstream_request_id": self.upstream_request_id,
            "retry_after_seconds": self.retry_after_seconds,
            "error_detail": self.error_detail,
        }


def claim(
    session: Session, job_id: str, *, now: datetime, lease_seconds: float, max_attempts: int
) -> ClaimedJob | None:
    """Take the job for one attempt, or return None if it is not ours to run."""
    claimable = or_(
        and_(Job.status == "queued", or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)),
        and_(Job.status == "running", Job.lease_until < now),
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_until=now + timedelta(seconds=lease_seconds),
            next_attempt_at=None,
            enqueued_at=None,  # the message is consumed: an expired lease is due at once
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult at runtime
        return None
    row = session.execute(
        select(Job.tenant_id, Job.batch_id, Job.attempts, Job.attempts_base, Job.request).where(
            Job.id == job_id
        )
    ).one()
    if row.attempts - row.attempts_base > max_attempts:
        # The previous attempts died without recording an outcome (a worker killed mid-call,
        # perhaps by this very job): stop here instead of looping for ever.
        _finish(
            session,
            job_id,
            row.attempts,
            now,
            status="failed",
            code="attempts_exhausted",
            error=f"gave up after {max_attempts} attempts that did not complete",
        )
        return None
    return ClaimedJob(job_id, row.tenant_id, row.batch_id, row.attempts, row.request, row.attempts_base)


def renew_leases(
    session: Session, claims: list[tuple[str, int]], *, now: datetime, lease_seconds: float
) -> int:
    """Extend the leases of calls still running here, so no sweeper takes them over."""
    renewed = 0
    until = now + timedelta(seconds=lease_seconds)
    for job_id, attempt in claims:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
            .values(lease_until=until)
            .execution_options(synchronize_session=False)
        )
        renewed += res.rowcount  # type: ignore[attr-defined]
    return renewed


def _finish(
    session: Session,
    job_id: str,
    attempt: int,
    now: datetime,
    *,
    status: str,
    code: str | None = None,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> bool:
    terminal = status != "queued"
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        .values(
            status=status,
            lease_until=None,
            next_attempt_at=next_attempt_at,
            enqueued_at=None,
            error_code=code,
            error=error,
            updated_at=now,
            finished_at=now if terminal else None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def store_success(
    session: Session, job: ClaimedJob, record: AttemptRecord, completion: ParsedCompletion
) -> bool:
    """Attempt row, then (only if we still own the job) result, usage, basis, citations."""
    session.execute(insert(Attempt), [record.row(job.id)])
    if not _finish(session, job.id, job.attempt, record.finished_at, status="succeeded"):
        return False
    session.add(
        Result(
            job_id=job.id,
            attempt_number=job.attempt,
            raw_body=completion.raw_body,
            content=completion.content,
            parsed=completion.parsed,
            model=completion.model,
            finish_reason=completion.finish_reason,
            upstream_id=completion.upstream_id,
            created_at=record.finished_at,
        )
    )
    if completion.usage is not None:
        u = completion.usage
        session.add(
            Usage(
                job_id=job.id,
                prompt_tokens=_int(u.get("prompt_tokens")),
                completion_tokens=_int(u.get("completion_tokens")),
                total_tokens=_int(u.get("total_tokens")),
                details=u,
            )
        )
    _store_basis(session, job, completion)
    return True


def _store_basis(session: Session, job: ClaimedJob, completion: ParsedCompletion) -> None:
    for pos, basis in enumerate(completion.basis):
        bf = BasisField(
            job_id=job.id,
            position=pos,
            field=basis.field,
            reasoning=basis.reasoning,
            confidence=basis.confidence,
        )
        session.add(bf)
        session.flush()  # the citation rows need the field's id
        if basis.citations:
            session.execute(
                insert(Citation),
                [
                    {
                        "tenant_id": job.tenant_id,
                        "job_id": job.id,
                        "batch_id": job.batch_id,
                        "basis_field_id": bf.id,
                        "field": basis.field,
                        "field_position": pos,
                        "position": cpos,
                        "url": c.url,
                        "domain": c.domain,
                        "title": c.title,
                        "excerpts": c.excerpts,
                    }
                    for cpos, c in enumerate(basis.citations)
                ],
            )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    session.execute(insert(Attempt), [record.row(job.id)])
    if job.exhausted(max_attempts):
        _finish(
            session,
            job.id,
            job.attempt,
            record.finished_at,
            status="failed",
            code=code,
            error=f"{error} (gave up after {job.attempt - job.attempts_base} attempts)",
        )
        return "failed"
    _finish(
        session,
        job.id,
        job.attempt,
        record.finished_at,
        status="queued",
        code=code,
        error=error,
        next_attempt_at=next_attempt_at,
    )
    return "queued"


def store_failure(session: Session, job: ClaimedJob, record: AttemptRecord, *, code: str, error: str) -> None:
    session.execute(insert(Attempt), [record.row(job.id)])
    _finish(session, job.id, job.attempt, record.finished_at, status="failed", code=code, error=error)


def due_for_enqueue(
    session: Session, *, now: datetime, requeue_after_seconds: float, limit: int = 1000
) -> list[str]:
    """Jobs that need a (new) message: retries that are due, lost messages, expired leases.

    Marks them as enqueued now, so that several sweepers do not all send them.
    """
    stale = now - timedelta(seconds=requeue_after_seconds)
    due = or_(
        and_(
            Job.status == "queued",
            or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
        ),
        and_(
            Job.status == "running",
            Job.lease_until < now,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
        ),
    )
    ids = list(session.scalars(select(Job.id).where(due).order_by(Job.id).limit(limit)))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
    return ids


def clear_enqueued(session: Session, job_ids: list[str]) -> None:
    """Messages for these jobs could not be sent: let the next sweep send them."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status.in_(("queued", "running")))
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )
