"""Operability: the request id a job came in with, API keys' expiry and last use.

``jobs.request_id`` is the ``X-Request-ID`` of the API request that submitted the job (or the
one the API made up), so a worker's log lines for the job carry the same id as the API's.
``api_keys.expires_at`` (``pcq keys create --expires-in 90d``) and ``api_keys.last_used_at``
(shown by ``pcq keys list``) are nullable: existing keys never expire and show no last use
until their next request.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("request_id", sa.String(64), nullable=True))
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_id")
