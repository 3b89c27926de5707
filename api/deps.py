"""Request-scoped dependencies: the process's resources, a read session, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.service import Submitter
from pcq.db import SessionFactory
from pcq.jobs.errors import Unauthorized
from pcq.models import utcnow
from pcq.settings import Settings
from pcq.tenants import authenticate


@dataclass
class Resources:
    """Built once in the app's lifespan and shared by every request."""

    settings: Settings
    db_engine: Engine
    sessions: SessionFactory
    submitter: Submitter
    redis: Any | None  # a redis.Redis for readiness checks, when REDIS_URL is set


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


def tenant_id(
    res: ResourcesDep,
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str:
    """Authenticate ``Authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    presented = x_api_key
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            presented = value.strip()
    if not presented:
        raise Unauthorized("send your key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    tenant = authenticate(session, presented, res.settings.key_pepper.get_secret_value(), utcnow())
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant


TenantDep = Annotated[str, Depends(tenant_id)]
