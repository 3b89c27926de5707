"""Batches: submit many jobs at once (JSONL or JSON), follow them, export their results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import service, views
from api.batch_input import JSONL_TYPES
from api.deps import SINGLE_VALUED_QUERY, Cursor, ResourcesDep, SessionDep, TenantDep
from api.errors import error_responses
from api.routes.jobs import MAX_PAGE
from api.schemas import BatchOut, DomainCountOut, DomainPage, IdempotencyKeyHeader

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# JSONL bodies are documented as an array whose items are the lines, in order (OpenAPI 3.1 has
# no schema for a sequence of JSON texts). BatchCreate, BatchLine and ExportLine are added to
# the document's components by api.openapi.
_JSONL_BATCH = {
    "schema": {
        "type": "array",
        "minItems": 1,
        "items": {"$ref": "#/components/schemas/BatchLine"},
        "description": "JSONL: one BatchLine (a JSON object) per line, each item here being one line",
    },
    "example": [
        {
            "custom_id": "a",
            "body": {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]},
        }
    ],
}
BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "JSONL, one BatchLine per line, or JSON: a BatchCreate. Received whole (within "
        "PCQ_UPLOAD_TIMEOUT_SECONDS), then read request by request; a bad one rejects the whole batch, "
        "naming it. custom_id must be unique within a batch.",
        "content": {
            **{media: _JSONL_BATCH for media in JSONL_TYPES},
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}},
        },
    }
}
RESULTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSONL, one ExportLine per job in submission order (each item here being one line)",
        "content": {
            "application/x-ndjson": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/ExportLine"}}
            }
        },
    },
    **error_responses(401, 404, 503),
}


class JsonlResponse(StreamingResponse):
    media_type = "application/x-ndjson"


@router.post(
    "",
    status_code=202,
    response_model=BatchOut,
    responses=error_responses(401, 408, 409, 413, 422, 503),
    openapi_extra=BATCH_BODY_DOC,
)
async def submit_batch(
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> BatchOut:
    """Queue a batch: JSONL lines ``{"custom_id", "body"}`` or JSON ``{"requests": [...]}``."""
    batch, _ = await res.submitter.submit_batch(
        tenant, request.stream(), request.headers.get("content-type", ""), idempotency_key
    )
    return views.batch_out(batch, await run_in_threadpool(service.batch_counts, session, batch.id))


@router.get("/{batch_id}", response_model=BatchOut, responses=error_responses(401, 404, 503))
def get_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    """Progress of a batch: counts per status and whether every job has ended."""
    batch = service.get_batch(session, tenant, batch_id)
    return views.batch_out(batch, service.batch_counts(session, batch.id))


@router.post(
    "/{batch_id}/retry-failed",
    status_code=202,
    response_model=BatchOut,
    responses=error_responses(401, 404, 503),
)
async def retry_failed(batch_id: str, res: ResourcesDep, session: SessionDep, tenant: TenantDep) -> BatchOut:
    """Run the failed jobs of a batch again (only those); ``retried`` says how many."""
    batch, retried = await run_in_threadpool(res.submitter.retry_failed, tenant, batch_id)
    counts = await run_in_threadpool(service.batch_counts, session, batch.id)
    return views.batch_out(batch, counts, retried=retried)


@router.get("/{batch_id}/results", response_class=JsonlResponse, responses=RESULTS_DOC)
def batch_results(
    batch_id: str, res: ResourcesDep, session: SessionDep, tenant: TenantDep
) -> StreamingResponse:
    """JSONL, one line per job: ``{"custom_id", "job_id", "status", "result" | "error"}``."""
    service.get_batch(session, tenant, batch_id)

    def lines() -> Iterator[bytes]:
        # Its own session: the request's one is closed once the response starts streaming.
        with res.sessions() as export_session:
            for row in views.export_rows(service.batch_results(export_session, batch_id)):
                yield (json.dumps(row, ensure_ascii=False) + "\n").encode()

    return JsonlResponse(lines())


@router.get(
    "/{batch_id}/domains",
    response_model=DomainPage,
    responses=error_responses(401, 404, 422, 503),
    dependencies=SINGLE_VALUED_QUERY,
)
def batch_domains(
    batch_id: str,
    session: SessionDep,
    tenant: TenantDep,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> DomainPage:
    """The domains the batch's citations name, most cited first, with their citations and jobs,
    ``limit`` at a time; counted as answers are stored, so a running batch's counts grow."""
    rows, next_cursor = service.batch_domains(session, tenant, batch_id, cursor=cursor, limit=limit)
    return DomainPage(
        data=[DomainCountOut(domain=d.domain, citations=d.citations, jobs=d.jobs) for d in rows],
        next_cursor=next_cursor,
    )
