"""Statements on ``tenants`` and ``api_keys``, and the count of each tenant's queued and running
jobs that ``pcq tenants list`` shows beside its share."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

from sqlalchemy import Row, and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from pcq.db import SQLITE_BUSY_TIMEOUT_MS
from pcq.models import ACTIVE_STATUSES, ApiKey, Job, Tenant, TenantSpend

NOTE_USE_WAIT_MS = 200  # how long recording a key's use may wait for a lock


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
) -> Sequence[Row[str, str, str, datetime, datetime | None, datetime | None, datetime | None]]:
    """(key id, tenant name, prefix, created_at, revoked_at, expires_at, last_used_at) of every
    key, or of ``key_id``; oldest first."""
    q = select(
        ApiKey.id,
        Tenant.name,
        ApiKey.prefix,
        ApiKey.created_at,
        ApiKey.revoked_at,
        ApiKey.expires_at,
        ApiKey.last_used_at,
    ).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if key_id is not None:
        q = q.where(ApiKey.id == key_id)
    return session.execute(q.order_by(ApiKey.created_at, ApiKey.id)).all()


def note_use(session: Session, key_id: str, *, now: datetime, older_than: datetime) -> int:
    """Set the key's last_used_at to ``now`` unless it is ``older_than`` or newer already (a
    concurrent request set it): at most one write per key per interval, however busy the key.
    The number of rows changed.

    A request's authentication runs it, so it waits for a lock at most NOTE_USE_WAIT_MS (then
    raises, and the caller lets the use go unrecorded): a long transaction holding the key's row
    (PostgreSQL) or the database's write lock (SQLite, whose writers otherwise wait 30 s) must
    not hold up the request."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    if sqlite:
        session.execute(text(f"PRAGMA busy_timeout = {NOTE_USE_WAIT_MS}"))
    else:
        session.execute(text(f"SET LOCAL lock_timeout = '{NOTE_USE_WAIT_MS}ms'"))
    try:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < older_than))
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
    finally:
        if sqlite:  # the connection goes back to the pool: its writers wait as long as ever
            session.execute(text(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"))
    return int(result.rowcount)  # type: ignore[attr-defined]


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


def set_share(
    session: Session,
    tenant_id: str,
    *,
    weight: int | None,
    max_share: float | None,
    monthly_budget: float | None = None,
    no_budget: bool = False,
) -> None:
    """Set the tenant's weight, quota cap and monthly budget; a value left None is kept;
    ``no_budget`` clears the budget."""
    values: dict[str, float | None] = {
        k: v
        for k, v in (("weight", weight), ("max_share", max_share), ("monthly_budget", monthly_budget))
        if v is not None
    }
    if no_budget:
        values["monthly_budget"] = None
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def share_rows(
    session: Session, month: date
) -> Sequence[Row[float | None, str, int, float, float | None, str | None, int]]:
    """(spent in ``month``, name, weight, max_share, monthly_budget, status, jobs) by tenant
    name: one row per status of the tenant's queued and running jobs, or one with status None
    and 0 jobs for a tenant without any. One statement (the counts read
    ix_jobs_tenant_status_id, the spend one tenant_spend row)."""
    spent = (
        select(TenantSpend.spent)
        .where(TenantSpend.tenant_id == Tenant.id, TenantSpend.month == month)
        .scalar_subquery()
    )
    q = (
        select(
            spent,
            Tenant.name,
            Tenant.weight,
            Tenant.max_share,
            Tenant.monthly_budget,
            Job.status,
            func.count(Job.id),
        )
        .outerjoin(Job, and_(Job.tenant_id == Tenant.id, Job.status.in_(ACTIVE_STATUSES)))
        .group_by(Tenant.id, Tenant.name, Tenant.weight, Tenant.max_share, Tenant.monthly_budget, Job.status)
        .order_by(Tenant.name, Job.status)
    )
    return session.execute(q).all()
