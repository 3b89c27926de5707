"""Tenants and API keys: minting, listing and revoking (``pcq keys create|list|revoke``) and
authenticating; each tenant's share of the upstream quota (``pcq tenants set|list``). The
statements are pcq.repositories.tenants'; the caller owns the transaction."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pcq import costs
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.keys import KEY_SCHEME, MalformedKey, mint_key, parse_key, verify
from pcq.models import ApiKey, JobStatus, Tenant, new_id, utcnow
from pcq.repositories import tenants as rows

log = logging.getLogger(__name__)

# last_used_at is written at most this often per key: a busy key costs one write a minute.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def create_key(
    session: Session, tenant_name: str, pepper: str, expires_at: datetime | None = None
) -> tuple[Tenant, str]:
    """Create the tenant if new, mint a key for it, refused from ``expires_at`` on (None: never);
    returns the plaintext key (shown once)."""
    tenant = rows.tenant_by_name(session, tenant_name)
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        rows.add_tenant(session, tenant)
    key = mint_key(pepper)
    rows.add_key(
        session,
        ApiKey(
            id=new_id("key"),
            tenant_id=tenant.id,
            prefix=key.prefix,
            key_hash=key.key_hash,
            expires_at=expires_at,
        ),
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
    expires_at: datetime | None
    last_used_at: datetime | None

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


class KeyRefused(Exception):
    """A presented key that is not accepted; the message says why, as far as it may (the 401's
    detail)."""


INVALID_KEY = "invalid or revoked API key"


def tenant_for_key(session: Session, presented: str, pepper: str, now: datetime) -> str:
    """The tenant id for a presented key; raises KeyRefused.

    A malformed key (not the key's shape, or a checksum that does not match: pcq.keys) is
    refused with what is wrong with it, before any lookup. For a well-formed key an unknown
    prefix, a wrong secret and a revoked key get the one message, so a guesser learns nothing.
    An expired key says so, and since when: only after its secret has matched, so only its
    holder learns it, and that tells them to get a new key rather than to look for a typo.

    Nothing is cached: every request reads the key's row (one indexed lookup by prefix, in the
    request's own session), so a key revoked with ``pcq keys revoke`` is refused by every API
    process from the next request on. A key accepted has its last_used_at set to ``now`` in the
    session, when the stored one is over a minute old (the caller commits it).
    """
    try:
        prefix = parse_key(presented)
    except MalformedKey as exc:
        raise KeyRefused(str(exc)) from None
    row = rows.key_by_prefix(session, prefix)
    if row is None or not verify(presented, row.key_hash, pepper):
        raise KeyRefused(INVALID_KEY)
    if row.revoked_at is not None and row.revoked_at <= now:
        raise KeyRefused(INVALID_KEY)
    if row.expires_at is not None and row.expires_at <= now:
        raise KeyRefused(f"expired API key (since {row.expires_at:%Y-%m-%dT%H:%M:%SZ}): ask for a new one")
    if row.last_used_at is None or row.last_used_at < now - LAST_USED_RESOLUTION:
        _note_use(session, row.id, now)
    return row.tenant_id


def _note_use(session: Session, key_id: str, now: datetime) -> None:
    """Record the key's use; a failure (a read-only replica, a lock wait cut short, SQLite busy)
    is not the request's: it is rolled back (the write is the only one in an authentication's
    session) and the key is accepted all the same."""
    try:
        rows.note_use(session, key_id, now=now, older_than=now - LAST_USED_RESOLUTION)
    except SQLAlchemyError as exc:
        session.rollback()
        log.debug("last_used_at of API key %s not recorded (%s)", key_id, type(exc).__name__)


def authenticate(session: Session, presented: str, pepper: str, now: datetime) -> str | None:
    """The tenant id for a presented key, or None (``tenant_for_key`` without the reason)."""
    try:
        return tenant_for_key(session, presented, pepper, now)
    except KeyRefused:
        return None


def create_key_at(url: str, tenant: str, pepper: str = "", expires_at: datetime | None = None) -> str:
    """``create_key`` in its own unit of work on the database at ``url``: the plaintext key."""
    engine = make_engine(url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            _, key = create_key(session, tenant, pepper, expires_at)
    finally:
        engine.dispose()
    return key


# --- each tenant's share of the upstream quota

MAX_WEIGHT = 1000  # a weight beside 1 is a ratio; beyond this it would say nothing more


class UnknownTenant(LookupError):
    """No tenant has this name."""


class InvalidShare(ValueError):
    """A weight or quota cap out of its range; the message says which and why."""


@dataclass(frozen=True)
class TenantShare:
    """A tenant's share of the upstream quota and the work it has in the queue."""

    name: str
    weight: int  # its share against the other tenants with work waiting
    max_share: float  # the largest fraction of the quota it may use, even alone
    queued: int = 0
    running: int = 0
    monthly_budget: float | None = None  # USD per calendar month (UTC); None: no limit
    spent_this_month: float = 0.0  # USD billed this calendar month (UTC)


def check_weight(weight: int) -> int:
    if not 1 <= weight <= MAX_WEIGHT:
        raise InvalidShare(f"--weight must be a whole number from 1 to {MAX_WEIGHT}, not {weight}")
    return weight


def check_max_share(max_share: float) -> float:
    if not (math.isfinite(max_share) and 0 < max_share <= 1):
        raise InvalidShare(f"--max-share must be a fraction above 0 and at most 1, not {max_share}")
    return max_share


NO_BUDGET = math.inf  # a monthly budget of "none": no limit (stored as NULL)


def check_budget(budget: float) -> float:
    if not (budget == NO_BUDGET or (math.isfinite(budget) and budget >= 0)):
        raise InvalidShare(f"--monthly-budget must be USD, 0 or more (or none), not {budget}")
    return budget


def set_share(
    session: Session,
    name: str,
    *,
    weight: int | None,
    max_share: float | None,
    monthly_budget: float | None = None,
) -> TenantShare:
    """Set the weight, the quota cap, the monthly budget (``NO_BUDGET``: none) or several of the
    tenant ``name``; what it holds now (without counts). Raises InvalidShare before anything is
    read, UnknownTenant if there is none."""
    if weight is None and max_share is None and monthly_budget is None:
        raise InvalidShare("give --weight, --max-share, --monthly-budget or several")
    if weight is not None:
        check_weight(weight)
    if max_share is not None:
        check_max_share(max_share)
    if monthly_budget is not None:
        check_budget(monthly_budget)
    tenant = rows.tenant_by_name(session, name)
    if tenant is None:
        raise UnknownTenant(name)
    no_budget = monthly_budget == NO_BUDGET
    rows.set_share(
        session,
        tenant.id,
        weight=weight,
        max_share=max_share,
        monthly_budget=None if no_budget else monthly_budget,
        no_budget=no_budget,
    )
    return TenantShare(
        tenant.name,
        tenant.weight if weight is None else weight,
        tenant.max_share if max_share is None else max_share,
        monthly_budget=None
        if no_budget
        else (tenant.monthly_budget if monthly_budget is None else monthly_budget),
    )


def list_tenants(session: Session) -> list[TenantShare]:
    """Every tenant by name, with its weight, quota cap, queued and running jobs, monthly budget
    and this month's spend (one query)."""
    shares: dict[str, TenantShare] = {}
    for spent, name, weight, max_share, budget, status, jobs in rows.share_rows(
        session, costs.month_of(utcnow())
    ):
        share = shares.setdefault(
            name, TenantShare(name, weight, max_share, monthly_budget=budget, spent_this_month=spent or 0.0)
        )
        if status == JobStatus.QUEUED:
            shares[name] = replace(share, queued=jobs)
        elif status == JobStatus.RUNNING:
            shares[name] = replace(share, running=jobs)
    return list(shares.values())
