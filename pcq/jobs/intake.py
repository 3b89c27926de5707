"""Creating jobs and batches: validate, insert in one transaction, idempotency per tenant."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pcq.db import copy_rows
from pcq.jobs.errors import IdempotencyMismatch
from pcq.models import Batch, Job, JobStatus, new_id, utcnow


@dataclass(frozen=True)
class NewJob:
    """One validated job, before it has an id.

    ``request_json`` and ``metadata_json`` are the JSON texts the user submitted, kept verbatim
    (api/verbatim.py); ``model`` and ``stream`` were read from the validated request.
    """

    request_json: str
    model: str
    stream: bool = False
    custom_id: str | None = None
    metadata_json: str | None = None
    webhook_url: str | None = None

    def fingerprint(self) -> str:
        """Tells a replay from a reuse of an idempotency key: the same texts, the same job."""
        parts = (self.request_json, self.custom_id, self.metadata_json, self.webhook_url)
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _job_row(tenant_id: str, item: NewJob, batch_id: str | None, now: Any) -> dict[str, Any]:
    return {
        "id": new_id("job"),
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "custom_id": item.custom_id,
        "request_json": item.request_json,
        "model": item.model,
        "stream": item.stream,
        "metadata_json": item.metadata_json,
        "webhook_url": item.webhook_url,
        "status": JobStatus.QUEUED,
        "attempts": 0,
        "enqueued_at": now,
        "created_at": now,
        "updated_at": now,
    }


def create_job(
    session: Session, tenant_id: str, item: NewJob, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Insert one job; with an idempotency key a replay returns the first job (created=False)."""
    fingerprint = item.fingerprint()
    if idempotency_key is not None:
        existing = _job_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replayed(existing, fingerprint), False
    row = _job_row(tenant_id, item, None, utcnow())
    job = Job(**row, idempotency_key=idempotency_key, request_hash=fingerprint)
    try:
        session.add(job)
        session.flush()
    except IntegrityError:
        # Lost a race on the idempotency key. The insert was this transaction's first write,
        # so rolling it all back loses nothing (no SAVEPOINT: pysqlite's would commit).
        session.rollback()
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


def find_batch(session: Session, tenant_id: str, key: str) -> Batch | None:
    return session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    ).one_or_none()


def check_replay(batch: Batch, fingerprint: str | None) -> Batch:
    """A replay must carry the very body the key was first used with."""
    if batch.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different batch")
    return batch


def open_batch(
    session: Session,
    tenant_id: str,
    *,
    metadata_json: str | None,
    webhook_url: str | None,
    idempotency_key: str | None,
) -> Batch | None:
    """Insert the batch row (jobs follow); None if a racing request took the key first."""
    batch = Batch(
        id=new_id("bat"),
        tenant_id=tenant_id,
        total=0,
        metadata_json=metadata_json,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        created_at=utcnow(),
    )
    try:
        session.add(batch)
        session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        # Lost a race on the key; this was the transaction's first write (see create_job).
        session.rollback()
        return None
    return batch


def add_jobs(session: Session, batch: Batch, items: list[NewJob]) -> list[str]:
    """Insert jobs of an open batch: COPY on PostgreSQL, multi-row INSERTs elsewhere."""
    rows = [_job_row(batch.tenant_id, item, batch.id, batch.created_at) for item in items]
    if session.get_bind().dialect.name == "postgresql":
        _copy_jobs(session, rows)
    else:
        for start in range(0, len(rows), 1000):
            session.execute(insert(Job), rows[start : start + 1000])
    return [r["id"] for r in rows]


_COPY_COLUMNS = {  # column -> key in _job_row
    "id": "id",
    "tenant_id": "tenant_id",
    "batch_id": "batch_id",
    "custom_id": "custom_id",
    "request": "request_json",
    "model": "model",
    "stream": "stream",
    "metadata": "metadata_json",
    "webhook_url": "webhook_url",
    "status": "status",
    "attempts": "attempts",
    "enqueued_at": "enqueued_at",
    "created_at": "created_at",
    "updated_at": "updated_at",
}


def _copy_jobs(session: Session, rows: list[dict[str, Any]]) -> None:
    """COPY is cheaper than INSERT for thousands of rows (10,000 jobs: ~0.49 s instead of
    ~0.75 s, measured on a loaded 2-core machine), which keeps a large batch's intake inside
    its time budget."""
    copy_rows(
        session,
        "jobs",
        list(_COPY_COLUMNS),
        [[row[key] for key in _COPY_COLUMNS.values()] for row in rows],
        set(),
    )


def close_batch(session: Session, batch: Batch, total: int, fingerprint: str) -> None:
    batch.total = total
    batch.request_hash = fingerprint
    session.flush()


def create_batch(
    session: Session,
    tenant_id: str,
    items: list[NewJob],
    *,
    metadata_json: str | None,
    webhook_url: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> tuple[Batch, list[str], bool]:
    """Insert a batch and all its jobs at once; returns (batch, job ids, created)."""
    existing = find_batch(session, tenant_id, idempotency_key) if idempotency_key else None
    if existing is None:
        batch = open_batch(
            session,
            tenant_id,
            metadata_json=metadata_json,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        if batch is not None:
            ids = add_jobs(session, batch, items)
            close_batch(session, batch, len(ids), fingerprint)
            return batch, ids, True
        existing = find_batch(session, tenant_id, idempotency_key)  # type: ignore[arg-type]
        assert existing is not None
    return check_replay(existing, fingerprint), [], False
