"""Webhook events, decided: which events a job's end writes (in the same transaction as its
status: an outbox), what an event's body is, and what an attempt's outcome does to it.

- ``job.succeeded`` / ``job.failed`` / ``job.cancelled`` go to the job's ``webhook_url``, and to
  its batch's ``webhook_url`` when the batch asked for them (``webhook_events``).
- ``batch.completed`` goes to the batch's ``webhook_url`` once every job of the batch has ended.
  Writers that end jobs of the same batch lock its row before they look, so the one that ends
  the last job sees the others' and writes the event exactly once; a retry reopens the batch.
- The body ``{"type", "timestamp", "data"}`` is fixed at the first attempt (so every attempt of
  an event sends the same bytes); ``data`` is the job or batch as ``GET /v1/jobs/{id}`` or
  ``GET /v1/batches/{id}`` shows it, the job's result replaced by ``result_url`` when the job
  is larger than ``PCQ_WEBHOOK_MAX_INLINE_BYTES``.
- An attempt's outcome: a 2xx delivers; a 410 disables the URL for the tenant; anything else is
  tried again ``PCQ_WEBHOOK_RETRY_SCHEDULE`` seconds after the first failure (with jitter, and
  not before a 429's or 503's ``Retry-After``), and fails after the last.

The worker's deliverer (worker/deliverer.py) sends; this module decides.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from pcq import costs, views
from pcq.models import (
    JOB_EVENT_TYPES,
    DeliveryStatus,
    EventType,
    JobStatus,
    WebhookEvent,
    new_id,
)
from pcq.repositories import batches as batch_rows
from pcq.repositories import deliveries as rows
from pcq.repositories import jobs as job_rows
from pcq.repositories import results as result_rows
from pcq.repositories import webhooks as secret_rows

JOB_EVENTS = {
    JobStatus.SUCCEEDED: EventType.JOB_SUCCEEDED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.CANCELLED: EventType.JOB_CANCELLED,
}
# Jobs whose events one round of queries writes: each id is a bound parameter, and a statement
# may bind at most 32,766 (SQLite) or 65,535 (PostgreSQL); a cancel of a whole batch, or of a
# budget's queued jobs, ends far more jobs than that at once.
EVENTS_AT_ONCE = 1000
MAX_RETRY_AFTER = 86400.0  # a receiver's Retry-After is honoured up to a day
JITTER = 0.1  # a retry is moved by up to this share of its delay, either way


def _event(
    tenant_id: str, type_: str, url: str, now: datetime, job_id: str | None, batch_id: str | None
) -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "tenant_id": tenant_id,
        "type": type_,
        "job_id": job_id,
        "batch_id": batch_id,
        "url": url,
        "status": DeliveryStatus.PENDING,
        "created_at": now,
        "next_attempt_at": now,
        "failures": 0,
    }


def batch_event_types(text: str | None) -> set[str]:
    """The job event types a batch's URL also gets (stored as JSON text)."""
    return set(json.loads(text)) if text else set()


def record_finished(session: Session, finished: Sequence[tuple[str, str]], *, now: datetime) -> int:
    """Write the events of jobs that this transaction just ended: (job id, terminal status),
    ``EVENTS_AT_ONCE`` jobs at a time. One query per round when none of them has a webhook URL.
    Returns how many events were written. A batch whose jobs span rounds completes in the
    round that finds none of them active (all were ended before this call), and is marked
    notified there, so a later round writes its batch.completed no second time."""
    written = 0
    for start in range(0, len(finished), EVENTS_AT_ONCE):
        written += _record_round(session, finished[start : start + EVENTS_AT_ONCE], now)
    return written


def _record_round(session: Session, finished: Sequence[tuple[str, str]], now: datetime) -> int:
    targets = rows.hook_targets(session, [job_id for job_id, _ in finished])
    if not targets:
        return 0
    status_of = dict(finished)
    events: list[dict[str, Any]] = []
    batches: set[str] = set()
    for t in targets:
        type_ = JOB_EVENTS[JobStatus(status_of[t.job_id])]
        if t.job_url is not None:
            events.append(_event(t.tenant_id, type_, t.job_url, now, t.job_id, t.batch_id))
        if t.batch_url is not None and t.batch_id is not None:
            batches.add(t.batch_id)
            if type_ in batch_event_types(t.batch_events) and t.batch_url != t.job_url:
                events.append(_event(t.tenant_id, type_, t.batch_url, now, t.job_id, t.batch_id))
    if batches:
        waiting = rows.lock_batches_to_notify(session, batches)
        complete = rows.without_active_jobs(session, [b for b, _, _ in waiting]) if waiting else set()
        for batch_id, tenant_id, url in waiting:
            if batch_id in complete:
                events.append(_event(tenant_id, EventType.BATCH_COMPLETED, url, now, None, batch_id))
        if complete:
            rows.mark_notified(session, complete, now=now)
    rows.add_events(session, events)
    return len(events)


# --- delivery


@dataclass(frozen=True)
class Delivery:
    """One leased event, ready to send."""

    id: str  # the webhook-id
    tenant_id: str
    type: str
    url: str
    body: bytes
    secrets: list[str]  # current first, then those still in their grace period
    failures: int
    first_failed_at: datetime | None
    leased: datetime  # the lease this worker holds (its attempt is stored only under it)
    job_id: str | None = None  # the job or batch the event is about (for log lines)
    batch_id: str | None = None


def take_due(
    session: Session, *, now: datetime, lease_seconds: float, limit: int, max_inline_bytes: int, api_url: str
) -> list[Delivery]:
    """Lease up to ``limit`` due events, with their bodies (fixed now if this is their first
    attempt) and their tenants' signing secrets. Events to a disabled URL end ``disabled``."""
    leased = now + timedelta(seconds=lease_seconds)
    events = rows.claim_due(session, now=now, lease_until=leased, limit=limit)
    if not events:
        return []
    off = rows.disabled_urls(session, {(e.tenant_id, e.url) for e in events})
    if off:
        gone = [e for e in events if (e.tenant_id, e.url) in off]
        rows.set_status(session, [e.id for e in gone], DeliveryStatus.DISABLED)
        events = [e for e in events if (e.tenant_id, e.url) not in off]
    bodies = _bodies(session, [e for e in events if e.body is None], max_inline_bytes, api_url)
    rows.set_bodies(session, bodies)
    lost = [e.id for e in events if e.body is None and e.id not in bodies]
    if lost:  # what it reports is gone (cannot happen while events cascade with their job)
        rows.set_status(session, lost, DeliveryStatus.FAILED)
        events = [e for e in events if e.id not in lost]
    secrets = secret_rows.signing_secrets(session, {e.tenant_id for e in events}, now=now)
    return [
        Delivery(
            e.id,
            e.tenant_id,
            e.type,
            e.url,
            (e.body or bodies[e.id]).encode(),
            secrets[e.tenant_id],
            e.failures,
            e.first_failed_at,
            leased,
            e.job_id,
            e.batch_id,
        )
        for e in events
    ]


def _bodies(
    session: Session, events: list[WebhookEvent], max_inline_bytes: int, api_url: str
) -> dict[str, str]:
    """The body of each event: ``{"type", "timestamp", "data"}``."""
    data: dict[str, str] = {}
    job_ids = sorted({e.job_id for e in events if e.type in JOB_EVENT_TYPES and e.job_id is not None})
    if job_ids:
        jobs = job_rows.many(session, job_ids)
        answers = result_rows.answers_of(session, [j.id for j in jobs if j.status == JobStatus.SUCCEEDED])
        results = views.results_out(answers)
        for job in jobs:
            shown = views.job_out(job, results.get(job.id))
            text = shown.model_dump_json()
            if len(text.encode()) > max_inline_bytes:
                without = shown.model_dump(mode="json", exclude={"result"})
                without["result_url"] = f"{api_url.rstrip('/')}/v1/jobs/{job.id}"
                text = json.dumps(without, ensure_ascii=False)
            data[job.id] = text
    bodies: dict[str, str] = {}
    for e in events:
        if e.type == EventType.BATCH_COMPLETED and e.batch_id is not None:
            batch = batch_rows.get(session, e.tenant_id, e.batch_id)
            if batch is None:
                continue
            counts = views.all_counts(job_rows.status_counts(session, batch.id))
            shown_batch = views.batch_out(batch, counts)
            shown_batch.usage, shown_batch.cost = costs.batch_cost(session, batch.id, batch.estimated_cost)
            shown_text = shown_batch.model_dump_json()
        elif e.job_id in data:
            shown_text = data[e.job_id]
        else:
            continue
        stamp = e.created_at.isoformat().replace("+00:00", "Z")
        bodies[e.id] = f'{{"type": {json.dumps(e.type)}, "timestamp": "{stamp}", "data": {shown_text}}}'
    return bodies


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt to deliver found (worker/webhook_net.py's result, as stored)."""

    at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None
    response: str
    retry_after: float | None


def settle(session: Session, d: Delivery, outcome: AttemptOutcome, *, schedule: Sequence[float]) -> str:
    """Store the attempt and move the event on, if this worker's lease still holds it; returns
    its new status, or ``superseded`` when only the attempt was recorded."""
    code = outcome.status_code
    ok = code is not None and 200 <= code < 300 and outcome.error is None
    error = None if ok else (outcome.error or f"http_{code}")
    changes: dict[str, Any]
    if ok:
        changes = {"status": DeliveryStatus.DELIVERED, "delivered_at": outcome.at}
    elif code == 410:
        rows.disable_url(session, d.tenant_id, d.url, now=outcome.at)
        changes = {"status": DeliveryStatus.DISABLED}
    else:
        failures = d.failures + 1
        first = d.first_failed_at or outcome.at
        changes = {"failures": failures, "first_failed_at": first}
        if failures > len(schedule):
            changes["status"] = DeliveryStatus.FAILED
        else:
            delay = schedule[failures - 1]
            due = first + timedelta(seconds=delay * (1 + random.uniform(-JITTER, JITTER)))
            if code in (429, 503) and outcome.retry_after is not None:
                due = max(due, outcome.at + timedelta(seconds=min(outcome.retry_after, MAX_RETRY_AFTER)))
            changes["next_attempt_at"] = due
    attempt = {
        "event_id": d.id,
        "at": outcome.at,
        "status_code": code,
        "latency_ms": outcome.latency_ms,
        "error": error[:64] if error else None,
        "response": outcome.response[:1024] or None,
    }
    if not rows.record_attempt(session, attempt, changes, leased=d.leased):
        return "superseded"  # a redelivery (or another worker) holds the event now: only recorded
    return str(changes.get("status", DeliveryStatus.PENDING))


def reopen_batches(session: Session, job_ids: Sequence[str]) -> None:
    """These jobs were queued again: their batches will complete, and say so, again."""
    rows.reopen_batches(session, job_ids)


def redeliver(session: Session, event: WebhookEvent, *, now: datetime) -> None:
    """A user asks for an event again: a new attempt now, with the same id, on a fresh retry
    schedule; its URL, if a 410 disabled it, is enabled again."""
    rows.enable_url(session, event.tenant_id, event.url)
    rows.request_delivery(session, event.id, now=now)
