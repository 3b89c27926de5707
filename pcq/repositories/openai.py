"""Statements of the OpenAI-compatible views (api.openai_compat): uploaded files, and the reads
and writes of batches and jobs that only those views need (the rest they share with ``/v1``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session, defer

from pcq.models import Attempt, Batch, File, Job, Result

# --- files


def add_file(session: Session, file: File) -> None:
    session.add(file)
    session.flush()


def file_of(session: Session, tenant_id: str, file_id: str) -> File | None:
    """The tenant's file, without its content (loaded only by ``content_of``)."""
    return session.scalars(
        select(File).options(defer(File.content)).where(File.id == file_id, File.tenant_id == tenant_id)
    ).one_or_none()


def content_of(session: Session, tenant_id: str, file_id: str) -> bytes | None:
    return session.scalars(
        select(File.content).where(File.id == file_id, File.tenant_id == tenant_id)
    ).one_or_none()


def content_piece(session: Session, tenant_id: str, file_id: str, start: int, size: int) -> bytes | None:
    """``size`` bytes of the file's content from byte ``start`` (0-based; fewer at its end, none
    past it), or None if the tenant has no such file: a big file is sent a piece at a time."""
    piece = session.scalars(
        select(func.substr(File.content, start + 1, size)).where(
            File.id == file_id, File.tenant_id == tenant_id
        )
    ).one_or_none()
    return None if piece is None else bytes(piece)


def files_of_tenant(
    session: Session,
    tenant_id: str,
    *,
    purpose: str | None,
    after: str | None,
    newest_first: bool,
    limit: int,
) -> list[File]:
    """A page of the tenant's files in id (creation) order, after the file ``after``."""
    q = select(File).options(defer(File.content)).where(File.tenant_id == tenant_id)
    if purpose is not None:
        q = q.where(File.purpose == purpose)
    if after is not None:
        q = q.where(File.id < after if newest_first else File.id > after)
    return list(session.scalars(q.order_by(File.id.desc() if newest_first else File.id).limit(limit)))


def delete_file(session: Session, tenant_id: str, file_id: str) -> bool:
    res = session.execute(delete(File).where(File.id == file_id, File.tenant_id == tenant_id))
    return bool(res.rowcount)  # type: ignore[attr-defined]


# --- batches


def add_batch(session: Session, batch: Batch) -> None:
    session.add(batch)
    session.flush()


def set_openai_fields(
    session: Session, batch: Batch, *, input_file_id: str, endpoint: str, completion_window: str
) -> None:
    batch.input_file_id, batch.endpoint = input_file_id, endpoint
    batch.completion_window = completion_window
    session.flush()


def request_cancel(session: Session, batch: Batch, *, now: datetime) -> None:
    if batch.cancelling_at is None:
        batch.cancelling_at = now
        session.flush()


def openai_batch(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    """The tenant's batch, if it was created through the OpenAI-compatible API."""
    return session.scalars(
        select(Batch).where(
            Batch.id == batch_id, Batch.tenant_id == tenant_id, Batch.input_file_id.is_not(None)
        )
    ).one_or_none()


def openai_batches(session: Session, tenant_id: str, *, before: str | None, limit: int) -> list[Batch]:
    """The tenant's OpenAI-created batches, newest first (ids sort by creation)."""
    q = select(Batch).where(Batch.tenant_id == tenant_id, Batch.input_file_id.is_not(None))
    if before is not None:
        q = q.where(Batch.id < before)
    return list(session.scalars(q.order_by(Batch.id.desc()).limit(limit)))


def last_finished(session: Session, batch_ids: Sequence[str]) -> dict[str, datetime]:
    """When the last job of each batch ended (batches with no ended job are absent)."""
    rows = session.execute(
        select(Job.batch_id, func.max(Job.finished_at))
        .where(Job.batch_id.in_(batch_ids), Job.finished_at.is_not(None))
        .group_by(Job.batch_id)
    )
    return {batch_id: at for batch_id, at in rows if batch_id is not None and at is not None}


class OutputJob(NamedTuple):
    """A job of a batch as its output or error file shows it."""

    id: str
    custom_id: str | None
    status: str
    error: str | None
    error_code: str | None
    raw_body: str | None  # the upstream's answer, verbatim (succeeded jobs)
    status_code: int | None  # of the attempt that answered, or of the last one
    request_id: str | None  # the upstream's request id for that attempt


def output_page(
    session: Session, batch_id: str, statuses: Sequence[str], *, after: str, limit: int
) -> list[OutputJob]:
    """A page of the batch's jobs in ``statuses``, in submission order after the job ``after``
    (keyset), each with its stored answer and the attempt that gave it (for a reused answer, the
    origin's call; none once that job is deleted), or its last attempt."""
    last_attempt = (
        select(func.max(Attempt.number)).where(Attempt.job_id == Job.id).correlate(Job).scalar_subquery()
    )
    number = func.coalesce(Result.attempt_number, last_attempt)
    rows = session.execute(
        select(
            Job.id,
            Job.custom_id,
            Job.status,
            Job.error,
            Job.error_code,
            Result.raw_body,
            Attempt.status_code,
            Attempt.upstream_request_id,
        )
        .outerjoin(Result, Result.job_id == Job.id)
        # A reused answer's attempt is the call that made it, the origin's: the job's own
        # attempts (calls that failed before it was reused) did not give it.
        .outerjoin(
            Attempt,
            and_(Attempt.job_id == func.coalesce(Result.reused_from, Job.id), Attempt.number == number),
        )
        .where(Job.batch_id == batch_id, Job.status.in_(statuses), Job.id > after)
        .order_by(Job.id)
        .limit(limit)
    )
    return [OutputJob(*row) for row in rows]
