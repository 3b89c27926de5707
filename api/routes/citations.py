"""Citations: the flattened rows of every basis, filterable for audit."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from api import service, views
from api.deps import SINGLE_VALUED_QUERY, Cursor, SessionDep, TenantDep
from api.errors import error_responses
from api.routes.jobs import MAX_PAGE
from api.schemas import CitationPage
from pcq.repositories.results import CitationFilter


def _text(max_length: int, description: str) -> object:
    """A text filter: empty or longer than anything stored answers 422."""
    return Query(min_length=1, max_length=max_length, description=description)


Id = Annotated[str | None, _text(40, "exactly this id")]
# RFC 3339, as the document's "date-time" says: pydantic alone would also take a number (Unix
# seconds) or a date without a time.
RFC_3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc_3339(value: object) -> object:
    if value is not None and not (isinstance(value, str) and RFC_3339.fullmatch(value)):
        raise ValueError("must be an RFC 3339 time with its zone, e.g. 2026-11-23T00:00:00Z")
    return value


When = Annotated[
    datetime | None,
    BeforeValidator(_rfc_3339),
    Query(description="RFC 3339 (e.g. 2026-11-23T00:00:00Z); an exclusive bound on when the answer arrived"),
]

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
    job_id: Id = None,
    batch_id: Id = None,
    custom_id: Annotated[
        str | None, _text(255, "the job's custom_id (it may name jobs of several batches)")
    ] = None,
    domain: Annotated[str | None, _text(255, "the URL's host, any case (www. is part of it)")] = None,
    url: Annotated[str | None, _text(8192, "exactly this URL")] = None,
    field: Annotated[str | None, _text(8192, "the basis field, exactly")] = None,
    confidence: Annotated[str | None, _text(32, "the basis field's confidence, exactly (e.g. low)")] = None,
    created_after: When = None,
    created_before: When = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> CitationPage:
    """One row per citation, oldest first, with its job, field, reasoning and confidence; every
    filter given must hold."""
    where = CitationFilter(
        job_id=job_id,
        batch_id=batch_id,
        custom_id=custom_id,
        domain=domain,
        url=url,
        field=field,
        confidence=confidence,
        created_after=created_after,
        created_before=created_before,
    )
    rows, next_cursor = service.list_citations(session, tenant, where, cursor=cursor, limit=limit)
    return CitationPage(data=[views.citation_row(*row) for row in rows], next_cursor=next_cursor)
