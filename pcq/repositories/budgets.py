"""Statements on spend: a batch's usage and cost, the spend counters that budgets read
(``batches.spent`` of batches with a max_cost, ``tenant_spend`` per tenant and month), and the
locks that serialise the budget checks of one scope (pcq/costs.py decides)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import date
from typing import NamedTuple

from sqlalchemy import BigInteger, ColumnElement, and_, bindparam, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pcq.models import Attempt, Batch, Job, JobStatus, Tenant, TenantSpend, Usage


class Totals(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    spent: float


def batch_totals(session: Session, batch_id: str) -> Totals:
    """A batch's tokens (summed over its results' usage) and the cost of its attempts, in one
    round trip: its jobs by ix_jobs_batch_status, each one's attempts by their unique index."""
    spent = (
        select(func.coalesce(func.sum(Attempt.cost), 0.0))
        .join(Job, Job.id == Attempt.job_id)
        .where(Job.batch_id == batch_id)
        .scalar_subquery()
    )
    row = session.execute(
        select(
            func.coalesce(func.sum(Usage.prompt_tokens), 0),
            func.coalesce(func.sum(Usage.completion_tokens), 0),
            func.coalesce(func.sum(Usage.total_tokens), 0),
            spent,
        )
        .select_from(Usage)
        .join(Job, Job.id == Usage.job_id)
        .where(Job.batch_id == batch_id)
    ).one()
    return Totals(int(row[0]), int(row[1]), int(row[2]), float(row[3]))


def _lock_key(kind: str, ident: str) -> int:
    digest = hashlib.sha256(f"pcq:budget:{kind}:{ident}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_scopes(session: Session, *, batches: Sequence[str], tenants: Sequence[str]) -> None:
    """On PostgreSQL, transaction-scoped advisory locks on these budget scopes, taken in one
    global order (so two claims never wait on each other in a cycle); SQLite serialises
    writers, and the claim already took the write lock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted({_lock_key("batch", b) for b in batches} | {_lock_key("tenant", t) for t in tenants})
    for key in keys:
        session.execute(select(func.pg_advisory_xact_lock(literal(key, BigInteger))))


def _in_flight(scope: ColumnElement[bool], excluding: Sequence[str]) -> ColumnElement[bool]:
    """Running jobs of the scope (their calls may be billed), other than ``excluding``."""
    cond = and_(scope, Job.status == JobStatus.RUNNING)
    return and_(cond, Job.id.not_in(excluding)) if excluding else cond


def batch_spend(session: Session, batch_id: str, *, excluding: Sequence[str]) -> tuple[float, dict[str, int]]:
    """A batch's spend so far and its calls in flight per model, other than ``excluding``, read
    in one statement (one snapshot): a call stored meanwhile counts once, either way."""
    rows = session.execute(
        select(Batch.spent, Job.model, func.count(Job.id))
        .select_from(Batch)
        .outerjoin(Job, _in_flight(Job.batch_id == Batch.id, excluding))
        .where(Batch.id == batch_id)
        .group_by(Batch.spent, Job.model)
    ).all()
    return _spend(rows)


def tenant_spend(
    session: Session, tenant_id: str, month: date, *, excluding: Sequence[str]
) -> tuple[float, dict[str, int]]:
    """A tenant's spend in ``month`` and its calls in flight per model, other than
    ``excluding``, in one statement (as ``batch_spend``)."""
    rows = session.execute(
        select(func.coalesce(TenantSpend.spent, 0.0), Job.model, func.count(Job.id))
        .select_from(Tenant)
        .outerjoin(TenantSpend, and_(TenantSpend.tenant_id == Tenant.id, TenantSpend.month == month))
        .outerjoin(Job, _in_flight(Job.tenant_id == Tenant.id, excluding))
        .where(Tenant.id == tenant_id)
        .group_by(TenantSpend.spent, Job.model)
    ).all()
    return _spend(rows)


def _spend(rows: Sequence[tuple[float, str | None, int]]) -> tuple[float, dict[str, int]]:
    spent = float(rows[0][0]) if rows else 0.0
    return spent, {model: n for _, model, n in rows if model is not None and n}


_ADD_BATCH_SPEND = (
    update(Batch.__table__)  # type: ignore[arg-type]
    .where(Batch.__table__.c.id == bindparam("b_id"), Batch.__table__.c.max_cost.is_not(None))
    .values(spent=Batch.__table__.c.spent + bindparam("b_cost"))
)


def add_batch_spend(session: Session, costs: Sequence[tuple[str, float]]) -> None:
    """Add (batch id, cost) to the spend of those batches that have a max_cost (no other batch
    row is locked or written), in the order given."""
    if costs:
        session.execute(_ADD_BATCH_SPEND, [{"b_id": b, "b_cost": c} for b, c in costs])


def add_tenant_spend(session: Session, costs: Sequence[tuple[str, date, float]]) -> None:
    """Add (tenant id, month, cost) to each tenant's month, creating the row the first time."""
    if not costs:
        return
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(TenantSpend)
    stmt = stmt.on_conflict_do_update(
        index_elements=[TenantSpend.tenant_id, TenantSpend.month],
        set_={"spent": TenantSpend.spent + stmt.excluded.spent},
    )
    for tenant_id, month, cost in costs:  # one row each: ON CONFLICT takes one row a statement here
        session.execute(stmt.values(tenant_id=tenant_id, month=month, spent=cost))
