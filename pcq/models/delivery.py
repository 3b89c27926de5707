"""Webhook events and their delivery attempts: the outbox.

An event row is written in the same transaction as the status it reports (a job's terminal
status, a batch's last job ending), so no event is lost between the two; the workers deliver
it afterwards (worker/deliverer.py) and record each attempt.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, BigIntPK, UTCDateTime, utcnow


class EventType(StrEnum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    BATCH_COMPLETED = "batch.completed"


JOB_EVENT_TYPES = (EventType.JOB_SUCCEEDED, EventType.JOB_FAILED, EventType.JOB_CANCELLED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # not yet delivered; tried again at next_attempt_at
    DELIVERED = "delivered"  # a 2xx
    FAILED = "failed"  # every try of PCQ_WEBHOOK_RETRY_SCHEDULE failed
    DISABLED = "disabled"  # its URL answered 410 Gone: not sent to again for this tenant


class WebhookEvent(Base):
    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s.value) for s in DeliveryStatus)})", name="status"),
        # The deliverer's question: what is pending and due.
        Index("ix_webhook_events_status_next_attempt", "status", "next_attempt_at"),
        Index("ix_webhook_events_tenant_id", "tenant_id", "id"),
        Index("ix_webhook_events_job", "job_id"),
        Index("ix_webhook_events_batch", "batch_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), default=None)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), default=None)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    # The exact bytes sent, fixed at the first attempt so that every attempt sends the same.
    body: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # since the last (re)delivery request
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class WebhookAttempt(Base):
    """One row per attempt to deliver an event, whatever happened."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_event", "event_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(64), default=None)
    response: Mapped[str | None] = mapped_column(Text, default=None)  # at most 1 KiB of it


class DisabledWebhookUrl(Base):
    """A URL that answered 410 Gone: events of this tenant to it are not sent (``disabled``)
    until the tenant asks for one of them again (redeliver)."""

    __tablename__ = "webhook_disabled_urls"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    url_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # a URL may be 2 KB
    url: Mapped[str] = mapped_column(Text)
    disabled_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
