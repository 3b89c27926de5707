"""Indexes for the API's fleet gauges, so a scrape's reads do not grow with the backlog.

``ix_jobs_queued_created`` holds the queued jobs never retried (``next_attempt_at`` NULL), by
submission time: the oldest of them is its first entry (the retried ones are the first entries
of ``ix_jobs_status_next_attempt``'s queued range). Without it, the oldest-queued-job gauge read
every queued job's row. ``ix_jobs_active_batch`` holds the batch of each queued or running job:
the open batches are counted by stepping from one batch to the next in it, a probe per open
batch, instead of reading every active job. On PostgreSQL both are built ``CONCURRENTLY``, so
submissions and claims go on while they are built, and a build that failed is built again when
the migration runs again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 02:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# name -> (columns, predicate)
INDEXES = {
    "ix_jobs_queued_created": ("created_at", "status = 'queued' AND next_attempt_at IS NULL"),
    "ix_jobs_active_batch": ("batch_id", "status IN ('queued', 'running')"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, (columns, where) in INDEXES.items():
            op.execute(f"CREATE INDEX {name} ON jobs ({columns}) WHERE {where}")
        return
    # CONCURRENTLY cannot run in a transaction; a build that failed leaves an invalid index
    # behind with the revision still at 0010, which the DROP clears on the next run.
    with op.get_context().autocommit_block():
        for name, (columns, where) in INDEXES.items():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY {name} ON jobs ({columns}) WHERE {where}")


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
