"""Citations: the flattened rows of every basis, filterable for audit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import service, views
from api.deps import SINGLE_VALUED_QUERY, Cursor, QueryText, SessionDep, TenantDep
from api.errors import error_responses
from api.routes.jobs import MAX_PAGE
from api.schemas import CitationPage

router = APIRouter(prefix="/v1/citations", tags=["citations"])


@router.get(
    "",
    response_model=CitationPage,
    responses=error_responses(401, 404, 422, 503),
    dependencies=SINGLE_VALUED_QUERY,
)
def list_citations(
    session: SessionDep,
    tenant: TenantDep,
    job_id: QueryText = None,
    batch_id: QueryText = None,
    domain: QueryText = None,
    url: QueryText = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> CitationPage:
    """One row per citation, oldest first, with its job, field, reasoning and confidence."""
    rows, next_cursor = service.list_citations(
        session,
        tenant,
        job_id=job_id,
        batch_id=batch_id,
        domain=domain,
        url=url,
        cursor=cursor,
        limit=limit,
    )
    return CitationPage(data=[views.citation_row(*row) for row in rows], next_cursor=next_cursor)
