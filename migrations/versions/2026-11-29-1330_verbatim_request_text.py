"""jobs.request, jobs.metadata, batches.metadata: the submitted JSON text, not jsonb.

``jsonb`` re-orders object keys (shorter keys first), so a ``json_schema`` whose properties
were ``{"ceo", "hq"}`` reached the upstream as ``{"hq", "ceo"}``, and metadata came back
re-ordered. From this revision on these columns hold the exact text the user submitted, which
is what the upstream receives. Rows written before it keep jsonb's rendering of their value
(their original key order is lost; it cannot be recovered). SQLite already stored JSON text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 13:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("jobs", "request"), ("jobs", "metadata"), ("batches", "metadata"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite keeps JSON as text already
    for table, column in COLUMNS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE text USING "{column}"::text')


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in COLUMNS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE jsonb USING "{column}"::jsonb')
