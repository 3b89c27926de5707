"""Statements on ``batches``: intake (insert, finish, find by idempotency key) and reads."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from pcq.models import Batch


def by_idempotency_key(session: Session, tenant_id: str, key: str) -> Batch | None:
    return session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    ).one_or_none()


def add(session: Session, batch: Batch) -> None:
    """Insert the batch row now (an IntegrityError is raised here, not at commit)."""
    session.add(batch)
    session.flush()


def finish(
    session: Session,
    batch: Batch,
    *,
    total: int,
    request_hash: str,
    metadata_json: str | None,
    webhook_url: str | None,
    webhook_events: str | None = None,
    estimated_cost: float | None = None,
    max_cost: float | None = None,
) -> None:
    """Write what is known once all of a batch's jobs are in (one UPDATE)."""
    batch.metadata_json, batch.webhook_url = metadata_json, webhook_url
    batch.webhook_events = webhook_events
    batch.estimated_cost, batch.max_cost = estimated_cost, max_cost
    batch.total = total
    batch.request_hash = request_hash
    session.flush()


def get(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    return session.scalars(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    ).one_or_none()


def newest_first(session: Session, tenant_id: str, *, before: str | None, limit: int) -> list[Batch]:
    """The tenant's batches, newest first (ids sort by creation); ``before``: ids below this one."""
    q = select(Batch).where(Batch.tenant_id == tenant_id)
    if before is not None:
        q = q.where(Batch.id < before)
    return list(session.scalars(q.order_by(Batch.id.desc()).limit(limit)))
