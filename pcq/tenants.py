"""Tenants and API keys: minting, listing and revoking (``pcq keys create|list|revoke``) and
authenticating. The statements are pcq.repositories.tenants'; the caller owns the transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.keys import KEY_SCHEME, mint_key, split_prefix, verify
from pcq.models import ApiKey, Tenant, new_id
from pcq.repositories import tenants as rows


def create_key(session: Session, tenant_name: str, pepper: str) -> tuple[Tenant, str]:
    """Create the tenant if new, mint a key for it; returns the plaintext key (shown once)."""
    tenant = rows.tenant_by_name(session, tenant_name)
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        rows.add_tenant(session, tenant)
    key = mint_key(pepper)
    rows.add_key(
        session, ApiKey(id=new_id("key"), tenant_id=tenant.id, prefix=key.prefix, key_hash=key.key_hash)
    )
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


def list_keys(session: Session) -> list[KeyInfo]:
    """Every API key of every tenant, oldest first, revoked ones included."""
    return [KeyInfo(*row) for row in rows.key_rows(session)]


def revoke_key(session: Session, key_id: str, now: datetime) -> tuple[KeyInfo, bool]:
    """Revoke the key ``key_id`` as of ``now``; True if this call revoked it, False if it was
    revoked already (its ``revoked_at`` is kept). Raises ``UnknownKey``."""
    revoked = rows.revoke(session, key_id, now=now)
    found = rows.key_rows(session, key_id)
    if not found:
        raise UnknownKey(key_id)
    return KeyInfo(*found[0]), bool(revoked)


def authenticate(session: Session, presented: str, pepper: str, now: datetime) -> str | None:
    """The tenant id for a presented key, or None. Never says which part was wrong.

    Nothing is cached: every request reads the key's row (one indexed lookup by prefix, in the
    request's own session), so a key revoked with ``pcq keys revoke`` is refused by every API
    process from the next request on.
    """
    prefix = split_prefix(presented)
    if prefix is None:
        return None
    row = rows.key_by_prefix(session, prefix)
    if row is None or (row.revoked_at is not None and row.revoked_at <= now):
        return None
    return row.tenant_id if verify(presented, row.key_hash, pepper) else None


def create_key_at(url: str, tenant: str, pepper: str = "") -> str:
    """``create_key`` in its own unit of work on the database at ``url``: the plaintext key."""
    engine = make_engine(url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            _, key = create_key(session, tenant, pepper)
    finally:
        engine.dispose()
    return key
