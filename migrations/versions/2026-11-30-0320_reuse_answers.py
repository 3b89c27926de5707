"""Reusing paid answers (``"reuse": "24h"``): what finds an identical request, and what a
reused answer points to.

``jobs.request_sha256`` is the sha256 of the request text (NULL for jobs submitted before this
revision: their answers are not reused), ``jobs.reuse_seconds`` the window a job asked for
(NULL: it always calls), ``results.reused_from`` the job whose call made a reused answer.
``ix_jobs_reuse`` holds running and succeeded jobs by (tenant, request hash, status, finish
time): the claim asks it for a running identical request and for the newest succeeded one
(pcq.jobs.reuse). On PostgreSQL it is built ``CONCURRENTLY``, as in revision 0011.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 03:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_jobs_reuse"
COLUMNS = "tenant_id, request_sha256, status, finished_at"
WHERE = "status IN ('running', 'succeeded')"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.add_column("jobs", sa.Column("request_sha256", sa.String(64), nullable=True))
        op.add_column("jobs", sa.Column("reuse_seconds", sa.Integer(), nullable=True))
        op.add_column("results", sa.Column("reused_from", sa.String(40), nullable=True))
        op.execute(f"CREATE INDEX {INDEX} ON jobs ({COLUMNS}) WHERE {WHERE}")
        return
    # The columns are committed before the index is built (CONCURRENTLY runs outside a
    # transaction): a build that failed leaves them behind with the revision still at 0013, so
    # they are added only if missing when the migration runs again.
    op.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS request_sha256 VARCHAR(64)")
    op.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS reuse_seconds INTEGER")
    op.execute("ALTER TABLE results ADD COLUMN IF NOT EXISTS reused_from VARCHAR(40)")
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY {INDEX} ON jobs ({COLUMNS}) WHERE {WHERE}")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("reused_from")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reuse_seconds")
        batch.drop_column("request_sha256")
