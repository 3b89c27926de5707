"""Statements on ``tenants`` and ``api_keys``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from pcq.models import ApiKey, Tenant


def tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def add_tenant(session: Session, tenant: Tenant) -> None:
    """Insert the tenant now (its id is then there for its keys)."""
    session.add(tenant)
    session.flush()


def add_key(session: Session, key: ApiKey) -> None:
    """Insert the key with the transaction's next flush (at the latest, its commit)."""
    session.add(key)


def key_by_prefix(session: Session, prefix: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()


def key_rows(
    session: Session, key_id: str | None = None
) -> Sequence[Row[str, str, str, datetime, datetime | None]]:
    """(key id, tenant name, prefix, created_at, revoked_at) of every key, or of ``key_id``;
    oldest first."""
    q = select(ApiKey.id, Tenant.name, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at).join(
        Tenant, Tenant.id == ApiKey.tenant_id
    )
    if key_id is not None:
        q = q.where(ApiKey.id == key_id)
    return session.execute(q.order_by(ApiKey.created_at, ApiKey.id)).all()


def revoke(session: Session, key_id: str, *, now: datetime) -> int:
    """Revoke the key as of ``now`` unless it is revoked already; the number of rows changed."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def policies(session: Session, tenant_ids: list[str]) -> Sequence[Row[str, int, float]]:
    """(tenant id, weight, max_share) of the given tenants (the dispatcher's terms)."""
    if not tenant_ids:
        return []
    return session.execute(
        select(Tenant.id, Tenant.weight, Tenant.max_share).where(Tenant.id.in_(tenant_ids))
    ).all()
