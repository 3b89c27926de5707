"""Cost and budgets: what each call was billed, a batch's estimate and max_cost, a tenant's
monthly budget and its spend per month.

``attempts.cost`` is what a call was billed (USD) at the prices when it was stored; existing
attempts count 0 (their prices were never recorded, and a migration does not read
``PCQ_PRICES``). ``batches.estimated_cost`` is NULL for batches submitted before; ``max_cost``
and ``tenants.monthly_budget`` are NULL (no limit). ``batches.spent`` is kept for batches with a
``max_cost`` only, so it starts at 0. ``tenant_spend`` holds one row per tenant and calendar
month (UTC), added to as attempts are stored: the budget's check and ``pcq tenants list`` read
it instead of the month's attempts. No index is added: a batch's spend joins its jobs
(``ix_jobs_batch_status``) to their attempts through ``uq_attempts_job_id_number``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 03:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("attempts", sa.Column("cost", sa.Float(), server_default="0", nullable=False))
    op.add_column("batches", sa.Column("estimated_cost", sa.Float(), nullable=True))
    op.add_column("batches", sa.Column("max_cost", sa.Float(), nullable=True))
    op.add_column("batches", sa.Column("spent", sa.Float(), server_default="0", nullable=False))
    op.add_column("tenants", sa.Column("monthly_budget", sa.Float(), nullable=True))
    op.create_table(
        "tenant_spend",
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("spent", sa.Float(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_spend_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "month", name=op.f("pk_tenant_spend")),
    )


def downgrade() -> None:
    op.drop_table("tenant_spend")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("monthly_budget")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("spent")
        batch.drop_column("max_cost")
        batch.drop_column("estimated_cost")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("cost")
