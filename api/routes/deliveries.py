"""Webhook deliveries: every event sent (or to be sent) to a tenant's webhook URLs, with each
attempt, and a way to ask for one again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from api import service
from api.deps import SINGLE_VALUED_QUERY, Cursor, QueryText, ResourcesDep, SessionDep, TenantDep
from api.errors import error_responses
from api.routes.jobs import MAX_PAGE
from api.schemas import DeliveryPage, DeliveryStatusName

router = APIRouter(prefix="/v1/webhooks/deliveries", tags=["webhooks"])


@router.get(
    "",
    response_model=DeliveryPage,
    responses=error_responses(401, 404, 422, 503),
    dependencies=SINGLE_VALUED_QUERY,
)
def list_deliveries(
    session: SessionDep,
    tenant: TenantDep,
    job_id: QueryText = None,
    batch_id: QueryText = None,
    status: DeliveryStatusName | None = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> DeliveryPage:
    """Webhook events, oldest first, each with its attempts (status code, latency, error)."""
    data, next_cursor = service.list_deliveries(
        session, tenant, job_id=job_id, batch_id=batch_id, status=status, cursor=cursor, limit=limit
    )
    return DeliveryPage(data=data, next_cursor=next_cursor)


@router.post(
    "/{delivery_id}/redeliver",
    status_code=202,
    response_model=None,
    responses=error_responses(401, 404, 503),
)
async def redeliver(
    delivery_id: Annotated[str, Path(max_length=64)], res: ResourcesDep, tenant: TenantDep
) -> None:
    """Send the event again now, with the same webhook-id, on a fresh retry schedule (a URL a
    410 disabled is enabled again)."""
    await run_in_threadpool(res.submitter.redeliver, tenant, delivery_id)
