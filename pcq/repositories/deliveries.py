"""Statements on the webhook outbox (``webhook_events``, ``webhook_attempts``,
``webhook_disabled_urls``) and on the batch columns delivery needs. pcq.jobs.outbox decides
what they do; the worker's deliverer and the API run them through it."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pcq.models import (
    ACTIVE_STATUSES,
    Batch,
    DeliveryStatus,
    DisabledWebhookUrl,
    Job,
    WebhookAttempt,
    WebhookEvent,
)


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


# --- writing events (in the transaction that ends the jobs)


@dataclass(frozen=True)
class HookTarget:
    """Where the events of one job that just ended may go."""

    job_id: str
    tenant_id: str
    batch_id: str | None
    job_url: str | None
    batch_url: str | None
    batch_events: str | None  # JSON text of the job event types the batch's URL also gets


def hook_targets(session: Session, job_ids: Sequence[str]) -> list[HookTarget]:
    """Those of ``job_ids`` with a webhook URL of their own or of their batch (one query)."""
    rows = session.execute(
        select(Job.id, Job.tenant_id, Job.batch_id, Job.webhook_url, Batch.webhook_url, Batch.webhook_events)
        .outerjoin(Batch, Batch.id == Job.batch_id)
        .where(Job.id.in_(job_ids), or_(Job.webhook_url.is_not(None), Batch.webhook_url.is_not(None)))
    ).all()
    return [HookTarget(*row) for row in rows]


def lock_batches_to_notify(session: Session, batch_ids: Collection[str]) -> list[tuple[str, str, str]]:
    """(id, tenant_id, webhook_url) of those batches with a URL whose batch.completed event is not
    written yet, their rows locked (in id order, so two writers never deadlock) until commit:
    the writer that ends a batch's last job then sees every other writer's jobs as they are."""
    rows = session.execute(
        select(Batch.id, Batch.tenant_id, Batch.webhook_url)
        .where(
            Batch.id.in_(sorted(batch_ids)),
            Batch.webhook_url.is_not(None),
            Batch.completion_notified_at.is_(None),
        )
        .order_by(Batch.id)
        .with_for_update()
    ).all()
    return [(i, t, u) for i, t, u in rows if u is not None]


def without_active_jobs(session: Session, batch_ids: Collection[str]) -> set[str]:
    """Those batches none of whose jobs is queued or running (an index probe per batch)."""
    active = exists().where(Job.batch_id == Batch.id, Job.status.in_(ACTIVE_STATUSES))
    return set(session.scalars(select(Batch.id).where(Batch.id.in_(list(batch_ids)), ~active)))


def mark_notified(session: Session, batch_ids: Collection[str], *, now: datetime) -> None:
    session.execute(
        update(Batch)
        .where(Batch.id.in_(list(batch_ids)))
        .values(completion_notified_at=now)
        .execution_options(synchronize_session=False)
    )


def reopen_batches(session: Session, job_ids: Sequence[str]) -> None:
    """Batches of these (requeued) jobs will complete again, and say so again."""
    of_jobs = select(Job.batch_id).where(Job.id.in_(job_ids), Job.batch_id.is_not(None))
    session.execute(
        update(Batch)
        .where(Batch.id.in_(of_jobs), Batch.completion_notified_at.is_not(None))
        .values(completion_notified_at=None)
        .execution_options(synchronize_session=False)
    )


def add_events(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(WebhookEvent), rows)


# --- delivering (the worker)


def claim_due(session: Session, *, now: datetime, lease_until: datetime, limit: int) -> list[WebhookEvent]:
    """Lease up to ``limit`` pending events that are due (or whose lease expired: their worker
    died mid-delivery), oldest due first. Rows another worker is claiming are skipped."""
    due = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.status == DeliveryStatus.PENDING,
            WebhookEvent.next_attempt_at <= now,
            or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until < now),
        )
        .order_by(WebhookEvent.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(due))
    if not ids:
        return []
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(ids))
        .values(lease_until=lease_until)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(select(WebhookEvent).where(WebhookEvent.id.in_(ids))))


def set_status(session: Session, event_ids: Collection[str], status: str) -> None:
    """End these leased events without an attempt (their URL is disabled)."""
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(list(event_ids)))
        .values(status=status, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def set_bodies(session: Session, bodies: dict[str, str]) -> None:
    for event_id, body in bodies.items():
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id, WebhookEvent.body.is_(None))
            .values(body=body)
            .execution_options(synchronize_session=False)
        )


def disabled_urls(session: Session, pairs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (tenant id, url) pairs answered 410 Gone."""
    if not pairs:
        return set()
    hashed = {(t, url_sha256(u)): (t, u) for t, u in pairs}
    tenants = {t for t, _ in pairs}
    rows = session.execute(
        select(DisabledWebhookUrl.tenant_id, DisabledWebhookUrl.url_sha256).where(
            DisabledWebhookUrl.tenant_id.in_(tenants),
            DisabledWebhookUrl.url_sha256.in_([h for _, h in hashed]),
        )
    )
    return {hashed[(t, h)] for t, h in rows if (t, h) in hashed}


def disable_url(session: Session, tenant_id: str, url: str, *, now: datetime) -> None:
    row = {"tenant_id": tenant_id, "url_sha256": url_sha256(url), "url": url, "disabled_at": now}
    if session.get_bind().dialect.name == "postgresql":
        session.execute(postgresql.insert(DisabledWebhookUrl).values(row).on_conflict_do_nothing())
    else:
        session.execute(sqlite.insert(DisabledWebhookUrl).values(row).on_conflict_do_nothing())


def enable_url(session: Session, tenant_id: str, url: str) -> None:
    session.execute(
        delete(DisabledWebhookUrl).where(
            DisabledWebhookUrl.tenant_id == tenant_id, DisabledWebhookUrl.url_sha256 == url_sha256(url)
        )
    )


def record_attempt(
    session: Session, attempt: dict[str, Any], changes: dict[str, Any], *, leased: datetime
) -> bool:
    """Store one attempt and move its event on, if this worker's lease still holds it (a
    redelivery request or another worker may have taken it since); True if it did."""
    moved = session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == attempt["event_id"], WebhookEvent.lease_until == leased)
        .values(lease_until=None, **changes)
        .execution_options(synchronize_session=False)
    )
    session.execute(insert(WebhookAttempt), [attempt])
    return bool(moved.rowcount)  # type: ignore[attr-defined]


# --- reads and requests (the API)


def events_of_tenant(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None,
    batch_id: str | None,
    status: str | None,
    after: str | None,
    limit: int,
) -> list[WebhookEvent]:
    q = select(WebhookEvent).where(WebhookEvent.tenant_id == tenant_id)
    if job_id is not None:
        q = q.where(WebhookEvent.job_id == job_id)
    if batch_id is not None:
        q = q.where(WebhookEvent.batch_id == batch_id)
    if status is not None:
        q = q.where(WebhookEvent.status == status)
    if after is not None:
        q = q.where(WebhookEvent.id > after)
    return list(session.scalars(q.order_by(WebhookEvent.id).limit(limit)))


def attempts_of(session: Session, event_ids: Sequence[str]) -> list[WebhookAttempt]:
    if not event_ids:
        return []
    q = select(WebhookAttempt).where(WebhookAttempt.event_id.in_(event_ids))
    return list(session.scalars(q.order_by(WebhookAttempt.event_id, WebhookAttempt.id)))


def event_of_tenant(session: Session, tenant_id: str, event_id: str) -> WebhookEvent | None:
    return session.scalars(
        select(WebhookEvent).where(WebhookEvent.id == event_id, WebhookEvent.tenant_id == tenant_id)
    ).first()


def request_delivery(session: Session, event_id: str, *, now: datetime) -> None:
    """Deliver this event again, now, on a fresh retry schedule (whatever its status)."""
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event_id)
        .values(
            status=DeliveryStatus.PENDING,
            next_attempt_at=now,
            lease_until=None,
            failures=0,
            first_failed_at=None,
        )
        .execution_options(synchronize_session=False)
    )
