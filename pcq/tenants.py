"""Tenants and API keys: minting (for ``pcq keys create``) and authenticating."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pcq.keys import mint_key, split_prefix, verify
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


def authenticate(session: Session, presented: str, pepper: str, now: datetime) -> str | None:
    """The tenant id for a presented key, or None. Never says which part was wrong."""
    prefix = split_prefix(presented)
    if prefix is None:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None or (row.revoked_at is not None and row.revoked_at <= now):
        return None
    return row.tenant_id if verify(presented, row.key_hash, pepper) else None
