"""Tenants and API keys: minting, listing and revoking (``pcq keys create|list|revoke``) and
authenticating."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pcq.keys import KEY_SCHEME, mint_key, split_prefix, verify
from pcq.models import ApiKey, Tenant, new_id


def create_key(session: Session, tenant_name: str, pepper: str) -> tuple[Tenant, str]:
    """Create the tenant if new, mint a key for it; returns the plaintext key (shown once)."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    key = mint_key(pepper)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, prefix=key.prefix, key_hash=key.key_hash))
    return tenant, key.plaintext


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of an API key: never its secret part nor its hash."""

    id: str
    tenant_name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def shown(self) -> str:
        """The key as it can be recognised, its secret elided: ``pcq_<prefix>_…``."""
        return f"{KEY_SCHEME}_{self.prefix}_…"


class UnknownKey(LookupError):
    """No API key has this id."""


def _key_infos(session: Session, *where: Any) -> list[KeyInfo]:
    rows = session.execute(
        select(ApiKey.id, Tenant.name, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(*where)
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    return [KeyInfo(*row) for row in rows]


def list_keys(session: Session) -> list[KeyInfo]:
    """Every API key of every tenant, oldest first, revoked ones included."""
    return _key_infos(session)


def revoke_key(session: Session, key_id: str, now: datetime) -> tuple[KeyInfo, bool]:
    """Revoke the key ``key_id`` as of ``now``; True if this call revoked it, False if it was
    revoked already (its ``revoked_at`` is kept). Raises ``UnknownKey``."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    found = _key_infos(session, ApiKey.id == key_id)
    if not found:
        raise UnknownKey(key_id)
    return found[0], bool(result.rowcount)  # type: ignore[attr-defined]


def authenticate(session: Session, presented: str, pepper: str, now: datetime) -> str | None:
    """The tenant id for a presented key, or None. Never says which part was wrong.

    Nothing is cached: every request reads the key's row (one indexed lookup by prefix, in the
    request's own session), so a key revoked with ``pcq keys revoke`` is refused by every API
    process from the next request on.
    """
    prefix = split_prefix(presented)
    if prefix is None:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None or (row.revoked_at is not None and row.revoked_at <= now):
        return None
    return row.tenant_id if verify(presented, row.key_hash, pepper) else None
