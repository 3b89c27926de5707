"""webhook_secrets: each tenant's webhook signing secrets (issue 11).

One row per secret: ``retired_at`` NULL for the current one (at most one per tenant, by a
partial unique index), else the end of its grace period, until which it still signs. New
table, nothing to backfill: a tenant's first secret is created on first use.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 19:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_webhook_secrets_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_secrets")),
    )
    op.create_index(op.f("ix_webhook_secrets_tenant_id"), "webhook_secrets", ["tenant_id"], unique=False)
    current = sa.text("retired_at IS NULL")
    op.create_index(
        "uq_webhook_secrets_tenant_current",
        "webhook_secrets",
        ["tenant_id"],
        unique=True,
        sqlite_where=current,
        postgresql_where=current,
    )


def downgrade() -> None:
    op.drop_index("uq_webhook_secrets_tenant_current", table_name="webhook_secrets")
    op.drop_index(op.f("ix_webhook_secrets_tenant_id"), table_name="webhook_secrets")
    op.drop_table("webhook_secrets")
