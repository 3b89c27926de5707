"""Request-scoped dependencies: the process's resources, a read session, the caller's tenant."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.events import StreamSlots
from api.service import Submitter
from api.tenant_limits import TenantRateLimiter
from pcq import logs
from pcq.db import SessionFactory
from pcq.jobs.errors import InvalidInput, Unauthorized
from pcq.models import utcnow
from pcq.settings import Settings
from pcq.tenants import KeyRefused, tenant_for_key

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """Built once in the app's lifespan and shared by every request."""

    settings: Settings
    db_engine: Engine
    sessions: SessionFactory
    submitter: Submitter
    redis: Any | None  # a redis.Redis for readiness checks, when REDIS_URL is set
    event_streams: StreamSlots  # PCQ_SSE_MAX_STREAMS_PER_TENANT (api.events)
    rate_limiter: TenantRateLimiter | None = None  # PCQ_API_RATE_LIMIT_PER_MINUTE; None = off
    # Set when the server begins to shut down (api.app.serve): event streams end at their next
    # poll, so their clients reconnect to another process instead of holding this one up.
    draining: threading.Event = field(default_factory=threading.Event)


def resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


ResourcesDep = Annotated[Resources, Depends(resources)]


def read_session(res: ResourcesDep) -> Iterator[Session]:
    session = res.sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(read_session)]
# For a route that streams its answer: the session ends when the route function returns, before
# the stream starts (a "request" scope would keep its connection idle in a transaction for as
# long as the client reads, and PostgreSQL ends such a session after a minute).
StreamingSessionDep = Annotated[Session, Depends(read_session, scope="function")]


# Declared as security schemes (either one will do), so OpenAPI clients know how to send a key.
bearer_key = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
header_key = APIKeyHeader(name="x-api-key", auto_error=False, description="`x-api-key: <key>`")


def tenant_id(
    res: ResourcesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_key)],
    x_api_key: Annotated[str | None, Security(header_key)],
) -> str:
    """Authenticate ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (a refusal's detail
    is pcq.tenants.tenant_for_key's: malformed, expired, or invalid or revoked).

    In a session of its own, closed before the route runs: the route's read session (if any)
    takes a connection only when it queries, so a request that then waits, for an upload's
    body above all, holds no database connection meanwhile."""
    presented = x_api_key
    if bearer is not None and bearer.credentials.strip():
        presented = bearer.credentials.strip()
    if not presented:
        raise Unauthorized("send your key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    try:
        tenant = tenant_of_key(res, presented)
    except KeyRefused as exc:
        raise Unauthorized(str(exc)) from None
    return tenant


def tenant_of_key(res: Resources, presented: str) -> str:
    """The tenant a presented key belongs to: the one check of a key, for the API's headers and
    the console's cookie alike (api.routes.console). Raises KeyRefused, whose message says why
    as far as it may. In a session of its own, which records the key's last use when due."""
    with res.sessions() as session:
        tenant = tenant_for_key(session, presented, res.settings.key_pepper.get_secret_value(), utcnow())
        try:
            session.commit()  # the key's last_used_at, when it was due
        except SQLAlchemyError as exc:  # the use goes unrecorded; the request goes on
            log.debug("last_used_at not committed (%s)", type(exc).__name__)
    return tenant


def rate_limited_tenant(res: ResourcesDep, tenant: Annotated[str, Depends(tenant_id)]) -> str:
    """The authenticated tenant, this request counted against its rate limit (429 beyond it;
    api.tenant_limits). FastAPI caches a dependency per request, so a request counts once."""
    if res.rate_limiter is not None:
        res.rate_limiter.check(tenant)
    return tenant


async def bound_tenant(tenant: Annotated[str, Depends(rate_limited_tenant)]) -> str:
    """The caller's tenant, bound for the request's log lines (pcq.logs). Async on purpose: a
    sync dependency runs in a thread, in a copy of the request's context, and what it binds
    there would not reach the route or uvicorn's access line."""
    logs.bind(tenant=tenant)
    return tenant


TenantDep = Annotated[str, Depends(bound_tenant)]


def single_valued_query(request: Request, _tenant: TenantDep) -> None:
    """Refuse a repeated query parameter: each takes one value, and reading only one would hide
    the others (a filter the caller believes applied). After authentication, like the checks of
    the parameters themselves."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise InvalidInput(f"query parameter {name!r} given more than once; it takes one value")
        seen.add(name)


SINGLE_VALUED_QUERY = [Depends(single_valued_query)]

# A filter or cursor in a query: an empty one names nothing, so it is refused (422), not ignored.
QueryText = Annotated[str | None, Query(min_length=1)]
Cursor = Annotated[
    str | None,
    Query(min_length=1, description="next_cursor of the previous page; any other value answers 422"),
]
