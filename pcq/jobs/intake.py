"""Creating jobs and batches: validate, insert in one transaction, idempotency per tenant."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pcq.jobs.errors import IdempotencyMismatch
from pcq.models import Batch, Job, new_id, utcnow


@dataclass(frozen=True)
class NewJob:
    """One validated job, before it has an id."""

    request: dict[str, Any]
    custom_id: str | None = None
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None


def request_hash(payload: Any) -> str:
    """A stable fingerprint of a request body, to tell a replay from a reuse of the key."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _job_row(tenant_id: str, item: NewJob, batch_id: str | None, now: Any) -> dict[str, Any]:
    return {
        "id": new_id("job"),
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "custom_id": item.custom_id,
        "request": item.request,
        "model": item.request["model"],
        "stream": bool(item.request.get("stream")),
        "meta": item.metadata,
        "webhook_url": item.webhook_url,
        "status": "queued",
        "attempts": 0,
        "enqueued_at": now,
        "created_at": now,
        "updated_at": now,
    }


def create_job(
    session: Session, tenant_id: str, item: NewJob, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Insert one job; with an idempotency key a replay returns the first job (created=False)."""
    fingerprint = request_hash(
        {
            "request": item.request,
            "custom_id": item.custom_id,
            "metadata": item.metadata,
            "webhook_url": item.webhook_url,
        }
    )
    if idempotency_key is not None:
        existing = _job_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replayed(existing, fingerprint), False
    row = _job_row(tenant_id, item, None, utcnow())
    job = Job(**row, idempotency_key=idempotency_key, request_hash=fingerprint)
    try:
        # A savepoint, so that losing a race on the idempotency key leaves the outer
        # transaction usable for reading the winner.
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        if idempotency_key is None:
            raise
        winner = _job_by_key(session, tenant_id, idempotency_key)
        if winner is None:
            raise
        return _replayed(winner, fingerprint), False
    return job, True


def _job_by_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    ).one_or_none()


def _replayed(job: Job, fingerprint: str) -> Job:
    if job.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different request body")
    return job


def create_batch(
    session: Session,
    tenant_id: str,
    items: list[NewJob],
    *,
    metadata: dict[str, Any] | None,
    webhook_url: str | None,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> tuple[Batch, list[str], bool]:
    """Insert a batch and all its jobs at once; returns (batch, job ids, created)."""
    if idempotency_key is not None:
        existing = _batch_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replayed_batch(existing, fingerprint), [], False
    now = utcnow()
    batch = Batch(
        id=new_id("bat"),
        tenant_id=tenant_id,
        total=len(items),
        meta=metadata,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        created_at=now,
    )
    try:
        with session.begin_nested():  # lose a race on the key without spoiling the transaction
            session.add(batch)
    except IntegrityError:
        winner = _batch_by_key(session, tenant_id, idempotency_key) if idempotency_key else None
        if winner is None:
            raise
        return _replayed_batch(winner, fingerprint), [], False
    rows = [_job_row(tenant_id, item, batch.id, now) for item in items]
    # One multi-row INSERT per chunk: an ORM object per job costs several times more.
    for start in range(0, len(rows), 1000):
        session.execute(insert(Job), rows[start : start + 1000])
    return batch, [r["id"] for r in rows], True


def _batch_by_key(session: Session, tenant_id: str, key: str) -> Batch | None:
    return session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    ).one_or_none()


def _replayed_batch(batch: Batch, fingerprint: str | None) -> Batch:
    if batch.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different batch")
    return batch
