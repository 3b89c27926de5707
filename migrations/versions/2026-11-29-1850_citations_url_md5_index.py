"""citations by URL: index md5(url) on PostgreSQL, not the URL itself.

A PostgreSQL btree entry holds at most 2,704 bytes. ``ix_citations_tenant_url`` indexed the
whole URL, so an answer citing a longer URL could not be stored, and the worker's COPY of
its write batch (up to 200 jobs) failed with it, again on every retry. The index now holds
``md5(url)``: 16 bytes whatever the URL, and a lookup by URL compares both the md5 and the
URL. SQLite has no such limit (and no md5()): its index is unchanged.

Building the index reads every citation row and blocks writes to ``citations`` meanwhile
(about a second per million rows on the benchmark machine).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 18:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_citations_tenant_url", table_name="citations")
    op.execute("CREATE INDEX ix_citations_tenant_url_md5 ON citations (tenant_id, md5(url), id)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_citations_tenant_url_md5", table_name="citations")
    op.create_index("ix_citations_tenant_url", "citations", ["tenant_id", "url", "id"])
