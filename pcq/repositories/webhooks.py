"""Statements on ``webhook_secrets``: each tenant's signing secrets (pcq/models/webhook.py).

A tenant's current secret (``retired_at`` NULL, one per tenant by a partial unique index) is
created on first use: by ``current_secret`` (``GET /v1/webhooks/secret``), or by
``signing_secrets`` when a delivery is signed before the tenant ever asked, so every delivery
is signed. Creation is ``INSERT … ON CONFLICT DO NOTHING`` on that index, then a read: two
first uses at once both end up with the one row that won (on PostgreSQL the loser's insert
waits for the winner's transaction, then reads its row). Functions that may create a secret
write; their caller commits.

Rotation retires the current secret at ``now + grace`` and inserts the new one; secrets whose
grace has not ended keep signing, newest first after the current one, at most
``MAX_SECRETS_IN_GRACE`` of them (a rotation beyond that ends the oldest one's grace at once:
the header of a delivery, and the HMACs computed for it, stay bounded); a rotation with no
grace stops every earlier secret at once. Rows past their grace are deleted by the tenant's
next rotation. The secrets are returned, never logged.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pcq.models import Tenant, WebhookSecret, new_id
from pcq.webhooks import new_secret

# Earlier secrets that may still sign beside the current one.
MAX_SECRETS_IN_GRACE = 4
# A rotation's insert loses to a concurrent rotation's new secret at most this many times in a
# row before it gives up (each retry retires the winner first, so one retry is the rule).
_ROTATE_TRIES = 5

_CURRENT: ColumnElement[bool] = WebhookSecret.retired_at.is_(None)


def _insert_current(session: Session) -> Any:
    """INSERT of a current secret that does nothing when the tenant already has one."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(WebhookSecret).on_conflict_do_nothing(
            index_elements=["tenant_id"], index_where=_CURRENT
        )
    if dialect == "sqlite":
        return sqlite.insert(WebhookSecret).on_conflict_do_nothing(
            index_elements=["tenant_id"], index_where=_CURRENT
        )
    return insert(WebhookSecret)  # another backend: a race is the unique index's IntegrityError


def _new_row(tenant_id: str, now: datetime) -> dict[str, Any]:
    return {"id": new_id("whs"), "tenant_id": tenant_id, "secret": new_secret(), "created_at": now}


def current_secret(session: Session, tenant_id: str, *, now: datetime) -> str:
    """The tenant's current secret, created (as of ``now``) if it has none yet."""
    query = select(WebhookSecret.secret).where(WebhookSecret.tenant_id == tenant_id, _CURRENT)
    secret = session.scalar(query)
    if secret is None:
        session.execute(_insert_current(session).values(_new_row(tenant_id, now)))
        secret = session.scalar(query)
    if secret is None:  # only if the tenant's row is gone (deleted with its secrets meanwhile)
        raise LookupError("the tenant has no webhook secret and none could be created")
    return secret


def rotate_secret(session: Session, tenant_id: str, *, now: datetime, grace_seconds: float) -> str:
    """Make a new current secret and return it; the one it replaces keeps signing until
    ``now + grace_seconds``. With no grace (0) every earlier secret stops at once, those still
    in an earlier rotation's grace too: only the new one signs (a secret that leaked). Two
    rotations at once are two rotations: the later retires the earlier's new secret in turn."""
    session.execute(
        delete(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.retired_at <= now)
    )
    retire = (
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, _CURRENT)
        .values(retired_at=now + timedelta(seconds=grace_seconds))
        .execution_options(synchronize_session=False)
    )
    for _ in range(_ROTATE_TRIES):
        # On PostgreSQL a concurrent rotation's UPDATE waits on the current row's lock, then
        # skips it (already retired) and its insert meets the winner's new row: it does nothing,
        # and the next round's UPDATE, a new statement, sees and retires that row.
        session.execute(retire)
        insert_new = _insert_current(session).values(_new_row(tenant_id, now))
        secret: str | None = session.scalar(insert_new.returning(WebhookSecret.secret))
        if secret is not None:
            break
    else:
        raise RuntimeError("could not rotate the webhook secret: concurrent rotations kept winning")
    _trim_grace(session, tenant_id, now, keep=MAX_SECRETS_IN_GRACE if grace_seconds > 0 else 0)
    return secret


def _trim_grace(session: Session, tenant_id: str, now: datetime, *, keep: int) -> None:
    """End the grace of the secrets in grace beyond the ``keep`` most recently retired (they
    stop now)."""
    beyond = session.scalars(
        select(WebhookSecret.id)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.retired_at > now)
        .order_by(WebhookSecret.retired_at.desc(), WebhookSecret.id.desc())
        .offset(keep)
    ).all()
    if beyond:
        session.execute(
            update(WebhookSecret)
            .where(WebhookSecret.id.in_(beyond))
            .values(retired_at=now)
            .execution_options(synchronize_session=False)
        )


def signing_secrets(session: Session, tenant_ids: Collection[str], *, now: datetime) -> dict[str, list[str]]:
    """For each tenant: the secrets that sign its deliveries at ``now``, the current one
    first, then those still in their grace period, most recently retired first. A tenant with
    no secret yet gets its current one created here (the caller commits); a tenant id that
    names no tenant is left out of the answer."""
    wanted = list(dict.fromkeys(tenant_ids))
    if not wanted:
        return {}
    signing = _signing(session, wanted, now)
    missing = [t for t in wanted if t not in signing]
    if missing:
        existing = session.scalars(select(Tenant.id).where(Tenant.id.in_(missing))).all()
        if existing:
            session.execute(_insert_current(session), [_new_row(t, now) for t in existing])
            signing.update(_signing(session, list(existing), now))
    return signing


def _signing(session: Session, tenant_ids: list[str], now: datetime) -> dict[str, list[str]]:
    """The signing secrets of those tenants that have a current one."""
    rows = session.execute(
        select(WebhookSecret.tenant_id, WebhookSecret.secret, WebhookSecret.retired_at).where(
            WebhookSecret.tenant_id.in_(tenant_ids), _CURRENT | (WebhookSecret.retired_at > now)
        )
    ).all()
    current: dict[str, str] = {}
    in_grace: dict[str, list[tuple[datetime, str]]] = {}
    for tenant_id, secret, retired_at in rows:
        if retired_at is None:
            current[tenant_id] = secret
        else:
            in_grace.setdefault(tenant_id, []).append((retired_at, secret))
    return {
        tenant_id: [secret, *(s for _, s in sorted(in_grace.get(tenant_id, ()), reverse=True))]
        for tenant_id, secret in current.items()
    }
