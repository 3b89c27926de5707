"""Citations: the flattened rows of every basis, filterable for audit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import repository
from api.deps import SessionDep, TenantDep
from api.errors import ERROR_RESPONSES
from api.routes.jobs import MAX_PAGE
from api.schemas import CitationPage

router = APIRouter(prefix="/v1/citations", tags=["citations"], responses=ERROR_RESPONSES)


@router.get("", response_model=CitationPage)
def list_citations(
    session: SessionDep,
    tenant: TenantDep,
    job_id: str | None = None,
    batch_id: str | None = None,
    domain: str | None = None,
    url: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> CitationPage:
    """One row per citation, oldest first, with its job, field, reasoning and confidence."""
    rows, next_cursor = repository.list_citations(
        session,
        tenant,
        job_id=job_id,
        batch_id=batch_id,
        domain=domain,
        url=url,
        cursor=cursor,
        limit=limit,
    )
    return CitationPage(data=rows, next_cursor=next_cursor)
