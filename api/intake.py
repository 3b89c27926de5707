"""Creating jobs and batches, in the caller's transaction: idempotency per tenant, and a batch
inserted in chunks as its body is read (COPY on PostgreSQL). The one intake of the API: a job
of ``POST /v1/jobs``, a batch of ``POST /v1/batches`` whether its body is JSONL or JSON
(api.batch_input reads both into the same ``NewJob`` items)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pcq import costs, logs
from pcq.jobs.errors import IdempotencyMismatch, InvalidInput
from pcq.models import Batch, Job, JobStatus, Priority, new_id, utcnow
from pcq.repositories import batches as batch_rows
from pcq.repositories import jobs as job_rows

# Jobs are inserted in chunks of at most this many, or this many bytes of request and metadata
# text: what a batch holds in memory at once, beside the line being read.
CHUNK_JOBS = 2000
CHUNK_BYTES = 1 * 1024 * 1024


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
    priority: Priority | None = None  # None: its batch's (a batch line that names none)
    reuse_seconds: int | None = None  # "reuse" (pcq.jobs.reuse); None: its batch's, if any

    def fingerprint(self) -> str:
        """Tells a replay from a reuse of an idempotency key: the same texts, the same job.

        The priority counts (it changes when the job runs), but ``normal`` is left out, so a
        job submitted without one and one submitted with ``"normal"`` are the same request,
        as they were before priorities existed."""
        parts: tuple[str | None, ...] = (
            self.request_json,
            self.custom_id,
            self.metadata_json,
            self.webhook_url,
        )
        if self.priority not in (None, Priority.NORMAL):
            parts += (self.priority,)
        if self.reuse_seconds is not None:  # absent before reuse existed: the same hashes as then
            parts += (f"reuse={self.reuse_seconds}",)
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def batch_fingerprint(
    body_sha256: str,
    priority: Priority | None,
    max_cost: float | None = None,
    reuse_seconds: int | None = None,
) -> str:
    """A batch's request hash: its body's sha256, and the ``?priority=`` it came with (not in
    the body) unless that is absent or ``normal``, which are the same request, and the
    ``?max_cost=`` and ``?reuse=`` if given."""
    extra = "" if priority in (None, Priority.NORMAL) else f" priority={priority}"
    if max_cost is not None:
        extra += f" max_cost={max_cost!r}"
    if reuse_seconds is not None:
        extra += f" reuse={reuse_seconds}"
    return hashlib.sha256(f"{body_sha256}{extra}".encode()).hexdigest() if extra else body_sha256


def request_sha256(request_json: str) -> str:
    """What finds a byte-identical request to reuse the answer of (jobs.request_sha256)."""
    return hashlib.sha256(request_json.encode()).hexdigest()


def _job_row(
    tenant_id: str,
    item: NewJob,
    batch_id: str | None,
    now: datetime,
    batch_priority: Priority | None = None,
    request_id: str | None = None,
    batch_reuse: int | None = None,
) -> dict[str, Any]:
    """A new job: queued, no attempt yet, no message sent (the dispatcher sends it). Its priority is its own,
    else its batch's, else normal; so is its reuse window, else none. ``request_id`` is the
    submitting request's (api.request_ids), so the worker's log lines for the job carry it."""
    return {
        "id": new_id("job"),
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "custom_id": item.custom_id,
        "request_json": item.request_json,
        "request_sha256": request_sha256(item.request_json),
        "reuse_seconds": item.reuse_seconds if item.reuse_seconds is not None else batch_reuse,
        "model": item.model,
        "stream": item.stream,
        "metadata_json": item.metadata_json,
        "webhook_url": item.webhook_url,
        "priority": (item.priority or batch_priority or Priority.NORMAL).rank,
        "status": JobStatus.QUEUED,
        "attempts": 0,
        "enqueued_at": None,
        "created_at": now,
        "updated_at": now,
        "request_id": request_id,
    }


def create_job(
    session: Session, tenant_id: str, item: NewJob, idempotency_key: str | None, *, sent: bool = False
) -> tuple[Job, bool]:
    """Insert one job; with an idempotency key a replay returns the first job (created=False).
    ``sent``: its message is sent after the commit by the caller, not by the dispatcher."""
    fingerprint = item.fingerprint()
    if idempotency_key is not None:
        existing = job_rows.by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replayed(existing, fingerprint), False
    row = _job_row(tenant_id, item, None, utcnow(), request_id=logs.bound().get("request_id"))
    if sent:
        row["enqueued_at"] = row["created_at"]
    job = Job(**row, idempotency_key=idempotency_key, request_hash=fingerprint)
    try:
        job_rows.add(session, job)
    except IntegrityError:
        # Lost a race on the idempotency key. The insert was this transaction's first write,
        # so rolling it all back loses nothing (no SAVEPOINT: pysqlite's would commit).
        session.rollback()
        if idempotency_key is None:
            raise
        winner = job_rows.by_idempotency_key(session, tenant_id, idempotency_key)
        if winner is None:
            raise
        return _replayed(winner, fingerprint), False
    return job, True


def _replayed(job: Job, fingerprint: str) -> Job:
    if job.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different request body")
    return job


def replayed_batch(session: Session, tenant_id: str, idempotency_key: str, fingerprint: str) -> Batch | None:
    """The batch first submitted with this key, if any; it must have had the very same body and
    ``?priority=`` (``fingerprint``: batch_fingerprint), else IdempotencyMismatch."""
    batch = batch_rows.by_idempotency_key(session, tenant_id, idempotency_key)
    return None if batch is None else _replayed_batch(batch, fingerprint)


def _replayed_batch(batch: Batch, fingerprint: str) -> Batch:
    if batch.request_hash != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different batch")
    return batch


class BatchSource(Protocol):
    """A batch body being read (api.batch_input): its jobs one by one, then its own metadata,
    webhook URL and priority, known once every job was read (a JSON batch may put them after its
    requests)."""

    metadata_json: str | None
    webhook_url: str | None
    webhook_events: str | None  # JSON text: the job event types the batch's URL also gets
    # The priority of its jobs that name none, as far as the body was read: a JSON batch may
    # name it after its requests, and a repeated member counts by its last value.
    priority: Priority | None
    max_cost: float | None  # USD (pcq/costs.py), known once every job was read
    reuse_seconds: int | None  # the reuse window of its jobs that name none, likewise

    def jobs(self) -> Iterator[NewJob]: ...


@dataclass
class StoredBatch:
    batch: Batch
    created: bool  # False: a replay, the batch another request stored with this idempotency key
    total: int = 0
    per_model: dict[str, int] = field(default_factory=dict)  # its jobs of each model
    # The new jobs' ids, one space-separated string per chunk inserted (a late batch priority
    # is given to them by chunk): a list of 100,000 str would take three times the memory.
    id_chunks: list[str] = field(default_factory=list)


def create_batch(
    session: Session,
    tenant_id: str,
    body: BatchSource,
    *,
    idempotency_key: str | None,
    fingerprint: str,
    prices: costs.Prices,
) -> StoredBatch:
    """Insert a batch and its jobs as ``body`` yields them, a chunk at a time; ``fingerprint``
    (batch_fingerprint) is kept to tell a replay from a reuse of the key.

    The batch row is inserted with the first chunk, so a body refused before then (a bad first
    request) never begins a transaction. If a racing request took the idempotency key first,
    nothing is inserted and that request's batch is returned (``created`` False), provided it
    had this very body. Its cost estimate is made at ``prices`` (pcq.costs.estimate)."""
    stored: StoredBatch | None = None
    # Per chunk inserted: the batch priority its jobs were given, and which took it ("1") rather
    # than naming their own ("0"), in case the body names another one later.
    given: list[tuple[Priority | None, str]] = []
    reuse_given: list[tuple[int | None, str]] = []  # the same, for the batch's reuse window
    request_id = logs.bound().get("request_id")
    for chunk in _in_chunks(body.jobs()):
        if stored is None:
            batch, created = _open_batch(session, tenant_id, idempotency_key, fingerprint)
            stored = StoredBatch(batch, created)
            if not created:
                return stored
        rows = [
            _job_row(
                tenant_id,
                item,
                stored.batch.id,
                stored.batch.created_at,
                body.priority,
                request_id,
                body.reuse_seconds,
            )
            for item in chunk
        ]
        job_rows.insert_many(session, rows)
        stored.total += len(rows)
        _count_models(stored.per_model, chunk)
        stored.id_chunks.append(" ".join(r["id"] for r in rows))
        given.append((body.priority, "".join("0" if item.priority else "1" for item in chunk)))
        reuse_given.append(
            (body.reuse_seconds, "".join("0" if item.reuse_seconds is not None else "1" for item in chunk))
        )
    if stored is None:  # the readers refuse an empty batch; belt and braces
        raise InvalidInput("the batch has no requests")
    _late_priority(session, stored, given, body.priority)
    _late_reuse(session, stored, reuse_given, body.reuse_seconds)
    batch_rows.finish(
        session,
        stored.batch,
        total=stored.total,
        request_hash=fingerprint,
        metadata_json=body.metadata_json,
        webhook_url=body.webhook_url,
        webhook_events=body.webhook_events,
        estimated_cost=costs.estimate(prices, stored.per_model),
        max_cost=body.max_cost,
    )
    return stored


def _count_models(per_model: dict[str, int], jobs: Iterator[NewJob] | list[NewJob]) -> int:
    n = 0
    for item in jobs:
        per_model[item.model] = per_model.get(item.model, 0) + 1
        n += 1
    return n


@dataclass(frozen=True)
class DryRun:
    """What a batch would be, had it been submitted: read and validated whole, stored nowhere."""

    total: int
    per_model: dict[str, int]
    estimated_cost: float
    max_cost: float | None
    webhook_url: str | None


def dry_run(body: BatchSource, prices: costs.Prices) -> DryRun:
    """Read and validate a batch body as ``create_batch`` does, without a database: its jobs per
    model and its cost estimate."""
    per_model: dict[str, int] = {}
    total = _count_models(per_model, body.jobs())
    if total == 0:  # the readers refuse an empty batch; belt and braces
        raise InvalidInput("the batch has no requests")
    return DryRun(total, per_model, costs.estimate(prices, per_model), body.max_cost, body.webhook_url)


def _late_priority(
    session: Session, stored: StoredBatch, given: list[tuple[Priority | None, str]], final: Priority | None
) -> None:
    """Give the batch's priority to the jobs inserted before it was read that take it (a JSON
    batch naming its ``priority`` after its ``requests``): an update of those jobs, in the same
    transaction, so no job is ever seen with another priority. Nothing to do otherwise."""
    final = final or Priority.NORMAL
    for ids, (priority, takes) in zip(stored.id_chunks, given, strict=True):
        if (priority or Priority.NORMAL) != final:
            stale = [job_id for job_id, flag in zip(ids.split(" "), takes, strict=True) if flag == "1"]
            job_rows.set_priority(session, stale, final.rank)


def _late_reuse(
    session: Session, stored: StoredBatch, given: list[tuple[int | None, str]], final: int | None
) -> None:
    """As ``_late_priority``, for the batch's ``reuse``: a JSON batch may name it after its
    requests."""
    for ids, (reuse_seconds, takes) in zip(stored.id_chunks, given, strict=True):
        if reuse_seconds != final:
            stale = [job_id for job_id, flag in zip(ids.split(" "), takes, strict=True) if flag == "1"]
            job_rows.set_reuse(session, stale, final)


def _open_batch(
    session: Session, tenant_id: str, idempotency_key: str | None, fingerprint: str
) -> tuple[Batch, bool]:
    """Insert the batch row (its jobs follow): (batch, True); or, if a racing request took the
    idempotency key first, (that request's batch, False)."""
    batch = Batch(
        id=new_id("bat"),
        tenant_id=tenant_id,
        total=0,
        metadata_json=None,
        webhook_url=None,
        idempotency_key=idempotency_key,
        created_at=utcnow(),
    )
    try:
        batch_rows.add(session, batch)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # Lost the race; this was the transaction's first write (see create_job).
        session.rollback()
        winner = batch_rows.by_idempotency_key(session, tenant_id, idempotency_key)
        if winner is None:
            raise
        return _replayed_batch(winner, fingerprint), False
    return batch, True


def _in_chunks(jobs: Iterator[NewJob]) -> Iterator[list[NewJob]]:
    chunk: list[NewJob] = []
    size = 0
    for job in jobs:
        chunk.append(job)
        size += len(job.request_json) + len(job.metadata_json or "")
        if len(chunk) >= CHUNK_JOBS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
