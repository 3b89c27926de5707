"""attempts.upstream_key_id: which upstream key made (and was billed for) each call.

With several upstream keys pooled, the audit trail must say which one carried a call. The id
is the first 16 hex characters of the key's sha256, never the key. Rows written before this
revision (one key only) keep NULL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("attempts", sa.Column("upstream_key_id", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("upstream_key_id")
