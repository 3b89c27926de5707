"""Batches: submit many jobs at once (JSONL or JSON), follow them, export their results."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import events, service, views
from api.batch_input import JSONL_TYPES
from api.deps import (
    SINGLE_VALUED_QUERY,
    Cursor,
    Resources,
    ResourcesDep,
    SessionDep,
    StreamingSessionDep,
    TenantDep,
)
from api.errors import error_responses
from api.routes.jobs import MAX_PAGE
from api.schemas import (
    MAX_COST,
    MAX_COST_RULE,
    CostEstimate,
    DomainCountOut,
    DomainPage,
    DryRunOut,
    IdempotencyKeyHeader,
    reuse_seconds,
)
from pcq import costs, logs
from pcq import views as shown
from pcq.jobs.errors import InvalidInput
from pcq.jobs.reuse import DURATION_PATTERN
from pcq.models import Batch, BatchStatus, Priority
from pcq.views import BatchOut

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

EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events. `batch.progress`: the batch (a BatchOut, as `GET "
        "/v1/batches/{batch_id}` shows it) as `data`, sent at connect and whenever its counts change "
        "(at most once a second); then one `batch.completed` (the batch, every job ended) and the "
        "stream ends. Every event has an `id`; a `: ping` comment comes after PCQ_SSE_PING_SECONDS "
        "without one.",
        # Before OpenAPI 3.2 (itemSchema), a text/event-stream schema describes each event.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "id", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": [events.PROGRESS, events.COMPLETED]},
                        "id": {
                            "type": "string",
                            "description": "Send it back as Last-Event-ID (or last_event_id) to resume",
                        },
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"$ref": "#/components/schemas/BatchOut"},
                        },
                    },
                }
            }
        },
    },
    204: {
        "description": "The batch has ended and the Last-Event-ID given is its final event: nothing "
        "newer will come (an EventSource stops reconnecting)"
    },
    **error_responses(401, 404, 429, 503),
}
PRIORITY_QUERY_DOC = (
    "The priority of the batch's jobs that name none (a JSONL body has no other place for it); "
    "a JSON body's own priority takes its place. Absent: normal."
)
REUSE_QUERY_DOC = (
    "The reuse window (30s, 15m, 24h, 7d; at most 30d) of the batch's jobs that name none (a JSONL "
    "body has no other place for it); a JSON body's own reuse takes its place. Absent: none."
)
LAST_EVENT_ID_DOC = (
    "The id of the last event received: only newer events are sent (not the state it showed "
    "again). An id this API did not send is ignored."
)


class JsonlResponse(StreamingResponse):
    media_type = "application/x-ndjson"


DRY_RUN_DOC = (
    "true: read and validate the batch exactly as a submission, answer 200 with its cost "
    "estimate (a DryRunOut), and store nothing"
)


@router.post(
    "",
    status_code=202,
    response_model=BatchOut,
    responses={
        200: {"model": DryRunOut, "description": "dry_run=true: the estimate; nothing was stored"},
        **error_responses(401, 408, 409, 413, 422, 503),
    },
    openapi_extra=BATCH_BODY_DOC,
    dependencies=SINGLE_VALUED_QUERY,
)
async def submit_batch(
    request: Request,
    res: ResourcesDep,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
    priority: Annotated[Priority | None, Query(description=PRIORITY_QUERY_DOC)] = None,
    max_cost: Annotated[
        float | None,
        Query(gt=0, le=MAX_COST, allow_inf_nan=False, description=f"{MAX_COST_RULE} A JSON body's own wins."),
    ] = None,
    dry_run: Annotated[bool, Query(description=DRY_RUN_DOC)] = False,
    reuse: Annotated[str | None, Query(description=REUSE_QUERY_DOC, pattern=DURATION_PATTERN)] = None,
) -> BatchOut | Response:
    """Queue a batch: JSONL lines ``{"custom_id", "body"}`` or JSON ``{"requests": [...]}``."""
    try:
        window = reuse_seconds(reuse)
    except ValueError as exc:  # before the body is read: nothing is stored
        raise InvalidInput(f"reuse: {exc}") from None
    ctype = request.headers.get("content-type", "")
    if dry_run:
        found = await res.submitter.dry_run_batch(tenant, request.stream(), ctype, priority, max_cost)
        shown_run = DryRunOut(
            total=found.total,
            models=found.per_model,
            cost=CostEstimate(estimated=costs.money(found.estimated_cost)),
            max_cost=found.max_cost,
        )
        return Response(shown_run.model_dump_json(), status_code=200, media_type="application/json")
    batch, _ = await res.submitter.submit_batch(
        tenant, request.stream(), ctype, idempotency_key, priority, max_cost, window
    )
    logs.bind(batch_id=batch.id)  # for the access line
    return shown.batch_out(batch, await run_in_threadpool(service.batch_counts, session, batch.id))


@router.get("/{batch_id}", response_model=BatchOut, responses=error_responses(401, 404, 503))
def get_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> BatchOut:
    """Progress of a batch: counts per status and whether every job has ended, its token usage
    and cost; while none of its jobs has started, its ``position`` in the dispatch order."""
    batch = service.get_batch(session, tenant, batch_id)
    out = service.with_cost(session, batch, shown.batch_out(batch, service.batch_counts(session, batch.id)))
    if out.status == BatchStatus.QUEUED:
        out.position = service.batch_position(session, tenant, batch.id)
    return out


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
    return shown.batch_out(batch, counts, retried=retried)


@router.get("/{batch_id}/results", response_class=JsonlResponse, responses=RESULTS_DOC)
def batch_results(
    batch_id: str, res: ResourcesDep, session: StreamingSessionDep, tenant: TenantDep
) -> StreamingResponse:
    """JSONL, one line per job: ``{"custom_id", "job_id", "status", "result" | "error"}``."""
    service.get_batch(session, tenant, batch_id)
    # A sync iterator: Starlette runs each step in its thread pool and stops asking for the
    # next one when the client goes away; every page is read in a session of its own
    # (service.batch_results), so nothing is held between steps.
    return JsonlResponse(views.export_lines(service.batch_results(res.sessions, batch_id)))


@router.get(
    "/{batch_id}/events",
    status_code=200,
    response_class=events.EventStreamResponse,
    responses=EVENTS_DOC,
)
async def batch_progress_events(
    batch_id: str,
    res: ResourcesDep,
    tenant: TenantDep,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", description=LAST_EVENT_ID_DOC + " Wins over the query's.")
    ] = None,
    last_event_id: Annotated[
        str | None, Query(description=LAST_EVENT_ID_DOC + " For clients that cannot set the header.")
    ] = None,
) -> Response:
    """Live progress of a batch as Server-Sent Events, until every job has ended."""
    # The header is what an EventSource sends on reconnecting, the query what it was opened with.
    last = events.EventId.parse(last_event_id_header) or events.EventId.parse(last_event_id)
    return await open_event_stream(res, tenant, batch_id, last)


async def open_event_stream(
    res: Resources, tenant: str, batch_id: str, last: events.EventId | None
) -> Response:
    """The event stream of a tenant's batch (404 if not its), within the tenant's cap of open
    streams; also the console's (api.routes.console), which authenticates by its cookie."""

    def first_read() -> tuple[Batch, dict[str, int]]:
        # Sessions of its own, each closed at once: the stream holds no connection between polls.
        with res.sessions() as session:
            return service.get_batch(session, tenant, batch_id), service.batch_counts(session, batch_id)

    def counts() -> dict[str, int]:
        with res.sessions() as session:
            return service.batch_counts(session, batch_id)

    def spend(out: BatchOut) -> BatchOut:
        with res.sessions() as session:
            return service.with_cost(session, batch, out)

    batch, now = await run_in_threadpool(first_read)
    if events.nothing_new(now, batch.total, last):
        return Response(status_code=204)
    release = res.event_streams.take(tenant)
    stream = events.batch_events(
        batch,
        now,
        counts,
        last=last,
        ping_seconds=res.settings.sse_ping_seconds,
        draining=res.draining,
        spend=spend,
    )
    return events.EventStreamResponse(stream, on_close=release)


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
