"""Fair dispatch: a job's priority, a tenant's weight and quota cap, the dispatcher's index.

``jobs.priority`` is the rank of ``high`` (0), ``normal`` (1) or ``low`` (2); existing jobs
are ``normal``. ``tenants.weight`` (1) and ``tenants.max_share`` (1.0) are what
``pcq tenants set`` changes. Each column has a constant default, which PostgreSQL (11+)
records in the catalog without rewriting a row.

``ix_jobs_dispatch`` holds only the jobs waiting for the dispatcher (queued, no message sent),
in its order: tenant, priority, batch, age (with ``next_attempt_at``, so a retry not yet due
is skipped in the index). ``ix_jobs_sent`` holds only the jobs sent and not yet claimed: what
the broker holds, which the dispatcher counts before each dispatch. On PostgreSQL both are
built ``CONCURRENTLY``, so submissions and claims go on while they are built.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# name -> (columns, predicate)
INDEXES = {
    "ix_jobs_dispatch": ("tenant_id, priority, batch_id, id, next_attempt_at", "enqueued_at IS NULL"),
    "ix_jobs_sent": ("enqueued_at", "enqueued_at IS NOT NULL"),
}


COLUMNS = (  # table, column, PostgreSQL type, default
    ("jobs", "priority", "smallint", "1"),
    ("tenants", "weight", "integer", "1"),
    ("tenants", "max_share", "double precision", "1"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column("jobs", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="1"))
        op.add_column("tenants", sa.Column("weight", sa.Integer(), nullable=False, server_default="1"))
        op.add_column("tenants", sa.Column("max_share", sa.Float(), nullable=False, server_default="1"))
        for name, (columns, where) in INDEXES.items():
            op.execute(f"CREATE INDEX {name} ON jobs ({columns}) WHERE status = 'queued' AND {where}")
        return
    # Safe to run again after a failure: the columns are committed before the indexes are
    # built (CONCURRENTLY cannot run in a transaction), so a build that failed leaves them, and
    # perhaps an invalid index, behind with the revision still at 0008.
    for table, column, type_, default in COLUMNS:
        op.execute(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type_} NOT NULL DEFAULT {default}"
        )
    with op.get_context().autocommit_block():  # commits the lines above
        for name, (columns, where) in INDEXES.items():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(
                f"CREATE INDEX CONCURRENTLY {name} ON jobs ({columns}) WHERE status = 'queued' AND {where}"
            )


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("max_share")
        batch.drop_column("weight")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
