"""OpenAI-compatible Files and Batches (``/openai/v1``).

``files`` holds uploaded batch input files, their bytes in the row (``bytea``), so every API
process reads the same ones; deleted with their tenant. ``batches`` gains what the OpenAI batch
object shows that pcq's does not: the input file, endpoint and completion window as given, the
JSON text of the validation errors that failed a batch (such a batch has no jobs), and when a
cancel was asked for. All nullable: batches of ``/v1`` have none of them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(48), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_files_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_tenant_id_id", "files", ["tenant_id", "id"])
    op.add_column("batches", sa.Column("input_file_id", sa.String(48), nullable=True))
    op.add_column("batches", sa.Column("endpoint", sa.String(64), nullable=True))
    op.add_column("batches", sa.Column("completion_window", sa.String(16), nullable=True))
    op.add_column("batches", sa.Column("openai_errors", sa.Text(), nullable=True))
    op.add_column("batches", sa.Column("cancelling_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("cancelling_at")
        batch.drop_column("openai_errors")
        batch.drop_column("completion_window")
        batch.drop_column("endpoint")
        batch.drop_column("input_file_id")
    op.drop_index("ix_files_tenant_id_id", table_name="files")
    op.drop_table("files")
