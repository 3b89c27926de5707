"""jobs.lease_losses: worker deaths under a job, counted apart from its attempts.

A claim of a job whose lease expired means its worker died mid-call. Counting those deaths
against PCQ_MAX_ATTEMPTS failed innocent jobs together with a job that kills its worker; kept
apart, they mark suspects (run one at a time per worker) and fail only repeat offenders.
Existing rows start at 0.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_losses", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_losses")
