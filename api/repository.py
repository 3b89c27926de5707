"""Read queries of the API; every one is scoped to a tenant (another tenant's row is absent)."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from api.schemas import BasisOut, CitationOut, CitationRow, JobOut, ResultOut, Usage
from pcq.jobs.errors import InvalidInput, NotFound
from pcq.models import JOB_STATUSES, BasisField, Batch, Citation, Job, JobStatus, Result
from pcq.models import Usage as UsageRow


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    """Stored metadata text as the user gave it (json keeps key order and big integers)."""
    return None if text is None else cast(dict[str, Any], json.loads(text))


def encode_cursor(value: str | int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not one this API returned") from exc


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).one_or_none()
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.scalars(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    ).one_or_none()
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return batch


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    status: str | None,
    batch_id: str | None,
    custom_id: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Job], str | None]:
    """Newest first."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        if status not in JOB_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(JOB_STATUSES)}")
        q = q.where(Job.status == status)
    if batch_id is not None:
        q = q.where(Job.batch_id == batch_id)
    if custom_id is not None:
        q = q.where(Job.custom_id == custom_id)
    if cursor is not None:
        q = q.where(Job.id < decode_cursor(cursor))
    rows = list(session.scalars(q.order_by(Job.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].id) if more and rows else None


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    counts: dict[str, int] = {s.value: 0 for s in JOB_STATUSES}
    for status, n in session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ):
        counts[status] = n
    return counts


@dataclass
class _Loaded:
    results: dict[str, Result]
    usage: dict[str, UsageRow]
    basis: dict[str, list[BasisOut]]


def _load_results(session: Session, job_ids: Sequence[str]) -> _Loaded:
    """Results, usage, basis and citations of many jobs in four queries."""
    results = {r.job_id: r for r in session.scalars(select(Result).where(Result.job_id.in_(job_ids)))}
    usage = {u.job_id: u for u in session.scalars(select(UsageRow).where(UsageRow.job_id.in_(job_ids)))}
    cites: dict[tuple[str, int], list[CitationOut]] = defaultdict(list)
    for c in session.scalars(
        select(Citation)
        .where(Citation.job_id.in_(job_ids))
        .order_by(Citation.job_id, Citation.field_position, Citation.position)
    ):
        cites[(c.job_id, c.field_position)].append(CitationOut(url=c.url, title=c.title, excerpts=c.excerpts))
    basis: dict[str, list[BasisOut]] = defaultdict(list)
    for b in session.scalars(
        select(BasisField)
        .where(BasisField.job_id.in_(job_ids))
        .order_by(BasisField.job_id, BasisField.position)
    ):
        basis[b.job_id].append(
            BasisOut(
                field=b.field,
                reasoning=b.reasoning,
                confidence=b.confidence,
                citations=cites[(b.job_id, b.position)],
            )
        )
    return _Loaded(results, usage, basis)


def _result_out(loaded: _Loaded, job_id: str) -> ResultOut | None:
    r = loaded.results.get(job_id)
    if r is None:
        return None
    u = loaded.usage.get(job_id)
    return ResultOut(
        content=r.content,
        parsed=r.parsed,
        model=r.model,
        finish_reason=r.finish_reason,
        usage=Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
        )
        if u is not None
        else None,
        basis=loaded.basis.get(job_id, []),
    )


def job_out(job: Job, result: ResultOut | None = None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        custom_id=job.custom_id,
        batch_id=job.batch_id,
        metadata=parse_metadata(job.metadata_json),
        model=job.model,
        attempts=job.attempts,
        webhook_url=job.webhook_url,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        next_attempt_at=job.next_attempt_at,
        error=job.error if job.status != JobStatus.SUCCEEDED else None,
        error_code=job.error_code if job.status != JobStatus.SUCCEEDED else None,
        result=result,
    )


def job_with_result(session: Session, job: Job) -> JobOut:
    if job.status != JobStatus.SUCCEEDED:
        return job_out(job)
    return job_out(job, _result_out(_load_results(session, [job.id]), job.id))


def export_rows(session: Session, batch_id: str, chunk: int = 500) -> Any:
    """Yield one dict per job of the batch, in submission order, loading in chunks."""
    last = ""
    while True:
        jobs = list(
            session.scalars(
                select(Job).where(Job.batch_id == batch_id, Job.id > last).order_by(Job.id).limit(chunk)
            )
        )
        if not jobs:
            return
        loaded = _load_results(session, [j.id for j in jobs if j.status == JobStatus.SUCCEEDED])
        for job in jobs:
            row: dict[str, Any] = {
                "custom_id": job.custom_id,
                "job_id": job.id,
                "status": job.status,
            }
            if job.status == JobStatus.SUCCEEDED:
                res = _result_out(loaded, job.id)
                row["result"] = res.model_dump(mode="json") if res else None
            elif job.error is not None:
                row["error"] = job.error
                row["error_code"] = job.error_code
            yield row
        last = jobs[-1].id


def list_citations(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None,
    batch_id: str | None,
    domain: str | None,
    url: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[CitationRow], str | None]:
    if job_id is not None:
        get_job(session, tenant_id, job_id)
    if batch_id is not None:
        get_batch(session, tenant_id, batch_id)
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
        q = q.where(Citation.domain == domain.lower())
    if url is not None:
        q = q.where(Citation.url == url)
    if cursor is not None:
        try:
            after = int(decode_cursor(cursor))
        except ValueError as exc:
            raise InvalidInput("cursor is not one this API returned") from exc
        q = q.where(Citation.id > after)
    rows = session.execute(q.order_by(Citation.id).limit(limit + 1)).all()
    more = len(rows) > limit
    out = [
        CitationRow(
            id=c.id,
            job_id=c.job_id,
            custom_id=custom_id,
            batch_id=c.batch_id,
            field=c.field,
            position=c.position,
            url=c.url,
            domain=c.domain,
            title=c.title,
            excerpts=c.excerpts,
            reasoning=reasoning,
            confidence=confidence,
        )
        for c, custom_id, reasoning, confidence in rows[:limit]
    ]
    return out, encode_cursor(out[-1].id) if more and out else None
