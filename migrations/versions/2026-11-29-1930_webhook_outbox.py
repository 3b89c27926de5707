"""Webhook events (the outbox), their delivery attempts, URLs disabled by a 410, and the two
batch columns delivery needs (the job events a batch's URL also gets; when its batch.completed
event was written). New tables and nullable columns: no existing row is rewritten.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 19:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Plain SQL types, no project imports: a migration must not change when the models do.
WHEN = sa.DateTime(timezone=True)
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("webhook_events", sa.Text(), nullable=True))
        batch.add_column(sa.Column("completion_notified_at", WHEN, nullable=True))
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40)),
        sa.Column(
            "tenant_id",
            sa.String(40),
            sa.ForeignKey("tenants.id", ondelete="CASCADE", name=op.f("fk_webhook_events_tenant_id_tenants")),
            nullable=False,
        ),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column(
            "job_id",
            sa.String(40),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name=op.f("fk_webhook_events_job_id_jobs")),
            nullable=True,
        ),
        sa.Column(
            "batch_id",
            sa.String(40),
            sa.ForeignKey("batches.id", ondelete="CASCADE", name=op.f("fk_webhook_events_batch_id_batches")),
            nullable=True,
        ),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("next_attempt_at", WHEN, nullable=False),
        sa.Column("lease_until", WHEN, nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", WHEN, nullable=True),
        sa.Column("delivered_at", WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'disabled')", name=op.f("ck_webhook_events_status")
        ),
    )
    op.create_index("ix_webhook_events_status_next_attempt", "webhook_events", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_events_tenant_id", "webhook_events", ["tenant_id", "id"])
    op.create_index("ix_webhook_events_job", "webhook_events", ["job_id"])
    op.create_index("ix_webhook_events_batch", "webhook_events", ["batch_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", BIGINT_PK, autoincrement=True),
        sa.Column(
            "event_id",
            sa.String(40),
            sa.ForeignKey(
                "webhook_events.id",
                ondelete="CASCADE",
                name=op.f("fk_webhook_attempts_event_id_webhook_events"),
            ),
            nullable=False,
        ),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index("ix_webhook_attempts_event", "webhook_attempts", ["event_id", "id"])
    op.create_table(
        "webhook_disabled_urls",
        sa.Column(
            "tenant_id",
            sa.String(40),
            sa.ForeignKey(
                "tenants.id", ondelete="CASCADE", name=op.f("fk_webhook_disabled_urls_tenant_id_tenants")
            ),
        ),
        sa.Column("url_sha256", sa.String(64)),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("disabled_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "url_sha256", name=op.f("pk_webhook_disabled_urls")),
    )


def downgrade() -> None:
    op.drop_table("webhook_disabled_urls")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_events")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("completion_notified_at")
        batch.drop_column("webhook_events")
