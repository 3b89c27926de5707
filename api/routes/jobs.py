"""Jobs: submit one, read one, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api import service
from api.deps import SINGLE_VALUED_QUERY, Cursor, QueryText, ResourcesDep, SessionDep, TenantDep
from api.errors import error_responses
from api.schemas import IdempotencyKeyHeader, JobCreate, JobPage
from pcq import logs, views
from pcq.models import JobStatus
from pcq.views import JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_PAGE = 1000


@router.post(
    "", status_code=202, response_model=JobOut, responses=error_responses(401, 408, 409, 413, 422, 503)
)
async def submit_job(
    body: JobCreate,
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    """Queue one chat-completion request; answers once the job is stored durably."""
    raw = await request.body()  # already read (and cached) to build ``body``
    job = await run_in_threadpool(res.submitter.submit_job, tenant, body, raw, idempotency_key)
    logs.bind(job_id=job.id)  # for the access line
    return views.job_out(job)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404, 503))
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    """A job with, once it succeeded, its answer, usage and basis with citations."""
    job = service.get_job(session, tenant, job_id)
    return views.job_with_result(job, service.answers_of(session, job))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(401, 404, 409, 503))
async def cancel_job(job_id: str, res: ResourcesDep, tenant: TenantDep) -> JobOut:
    """Cancel a queued or running job; a running call's answer is then discarded, not stored."""
    return views.job_out(await run_in_threadpool(res.submitter.cancel_job, tenant, job_id))


@router.post(
    "/{job_id}/retry", status_code=202, response_model=JobOut, responses=error_responses(401, 404, 409, 503)
)
async def retry_job(job_id: str, res: ResourcesDep, tenant: TenantDep) -> JobOut:
    """Run a failed (or cancelled) job again, with a fresh attempt budget."""
    return views.job_out(await run_in_threadpool(res.submitter.retry_job, tenant, job_id))


@router.get(
    "",
    response_model=JobPage,
    responses=error_responses(401, 422, 503),
    dependencies=SINGLE_VALUED_QUERY,
)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    batch_id: QueryText = None,
    custom_id: QueryText = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> JobPage:
    """Jobs, newest first; pass ``cursor=<next_cursor>`` for the next page."""
    jobs, next_cursor = service.list_jobs(
        session,
        tenant,
        status=status,
        batch_id=batch_id,
        custom_id=custom_id,
        cursor=cursor,
        limit=limit,
    )
    return JobPage(data=[views.job_out(j) for j in jobs], next_cursor=next_cursor)
