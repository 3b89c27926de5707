"""Audit queries: the field's confidence, the answer's time and the field's md5 copied into
citations, their indexes, and each batch's citations and jobs per domain.

``GET /v1/citations`` filters by ``confidence`` (a basis field's) and by ``created_after`` /
``created_before`` (when the answer was stored), in citation id order. Read through joins,
such a filter scans citations in id order and probes ``basis_fields`` or ``results`` for each
row until a page is full: fine for common values, a scan of the tenant's every row for a rare
or absent one. Copied into ``citations``, each filter is one index range read in id order.
``field_md5`` (hex ``md5(field)``) is what the field index holds, as ``md5(url)`` is for URLs
(a field name may be longer than a btree entry); a column, unlike an expression, can be
read from the index alone, with the INCLUDE columns (a field and a time window together).

``batch_domains`` holds each batch's citations and distinct jobs per domain, which the worker
keeps from now on (``GET /v1/batches/{id}/domains`` reads it instead of counting the batch's
citations at each request). It is counted here from the existing citations: one statement
reading ``citations``, after the columns are committed, which blocks neither readers nor
writers.

No long lock on ``citations``, in three steps:

1. ``ADD COLUMN`` nullable, without a default: PostgreSQL (11+) changes only the catalog, it
   rewrites no row. The ACCESS EXCLUSIVE lock lasts milliseconds, and it is committed at once
   (the autocommit block below begins by committing it).
2. Rows written before this revision are filled from ``basis_fields`` and ``results`` in
   chunks of 20,000 ids, each its own transaction: it locks only the rows it updates, for a
   fraction of a second, and the API goes on reading meanwhile. Run it with the workers of
   the older version stopped (``docker compose up`` does: it replaces them after
   ``migrate``): a citation an older worker stores after its chunk was filled keeps NULLs
   and is counted in no ``batch_domains`` row, and no time, confidence or field filter finds
   it. (The new version's workers need the new columns and table: start them after.)
3. The indexes are built ``CONCURRENTLY``: writes go on while each is built (about a second
   per million rows on the benchmark machine). The domain and batch indexes are rebuilt with
   ``INCLUDE (created_at, confidence)`` (built under a new name, the old one dropped, the new
   one renamed), so a time or confidence filter beside them is checked in the index.

SQLite (small, single-process deployments) does all of this in one transaction.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 19:10:00
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK = 20_000  # citation ids per backfill transaction


def text_md5(text: str) -> str:
    """PostgreSQL's ``md5(text)``, as the writer computes it (kept here: a migration must not
    change when the code it was written beside does)."""
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


# name -> (columns, INCLUDE columns on PostgreSQL)
INDEXES = {
    "ix_citations_tenant_confidence": ("tenant_id, confidence, id", "created_at"),
    "ix_citations_tenant_created_at": ("tenant_id, created_at, id", None),
    "ix_citations_tenant_field_md5": ("tenant_id, field_md5, id", "created_at, confidence"),
}
# Rebuilt with the new columns as INCLUDE: built under a new name, then swapped in.
REBUILT = {
    "ix_citations_tenant_domain": "tenant_id, domain, id",
    "ix_citations_tenant_batch": "tenant_id, batch_id, id",
}

BACKFILL_PG = """
UPDATE citations AS c SET confidence = b.confidence, created_at = r.created_at, field_md5 = md5(c.field)
FROM basis_fields AS b, results AS r
WHERE c.id >= :lo AND c.id < :hi AND c.created_at IS NULL
  AND b.job_id = c.job_id AND b.position = c.field_position AND r.job_id = c.job_id
"""

COUNT_DOMAINS = """
INSERT INTO batch_domains (batch_id, domain, citations, jobs)
SELECT batch_id, coalesce(domain, ''), count(*), count(DISTINCT job_id)
FROM citations WHERE batch_id IS NOT NULL GROUP BY batch_id, coalesce(domain, '')
"""

BACKFILL_SQLITE = """
UPDATE citations SET
  confidence = (SELECT b.confidence FROM basis_fields AS b
                WHERE b.job_id = citations.job_id AND b.position = citations.field_position),
  created_at = (SELECT r.created_at FROM results AS r WHERE r.job_id = citations.job_id)
WHERE created_at IS NULL
"""


def upgrade() -> None:
    op.add_column("citations", sa.Column("confidence", sa.String(length=32), nullable=True))
    op.add_column("citations", sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("citations", sa.Column("field_md5", sa.String(length=32), nullable=True))
    op.create_table(
        "batch_domains",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("citations", sa.BigInteger(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_domains_batch_id_batches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("batch_id", "domain", name=op.f("pk_batch_domains")),
    )
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.execute(COUNT_DOMAINS)
        op.execute(BACKFILL_SQLITE)
        fields = bind.execute(sa.text("SELECT DISTINCT field FROM citations")).scalars().all()
        for field in fields:  # SQLite has no md5(): the writer's own function
            bind.execute(
                sa.text("UPDATE citations SET field_md5 = :h WHERE field = :f"),
                {"h": text_md5(field), "f": field},
            )
        for name, (columns, _) in INDEXES.items():
            op.create_index(name, "citations", columns.split(", "))
        return
    with op.get_context().autocommit_block():  # commits the lines above: the lock is released
        bind.execute(sa.text(COUNT_DOMAINS))
        lo, hi = bind.execute(sa.text("SELECT min(id), max(id) FROM citations")).one()
        if lo is not None:
            for start in range(lo, hi + 1, CHUNK):
                bind.execute(sa.text(BACKFILL_PG), {"lo": start, "hi": start + CHUNK})
        for name, (columns, include) in INDEXES.items():
            extra = f" INCLUDE ({include})" if include else ""
            bind.execute(sa.text(f"CREATE INDEX CONCURRENTLY {name} ON citations ({columns}){extra}"))
        for name, columns in REBUILT.items():
            bind.execute(
                sa.text(
                    f"CREATE INDEX CONCURRENTLY {name}_0008 ON citations ({columns})"
                    " INCLUDE (created_at, confidence)"
                )
            )
            bind.execute(sa.text(f"DROP INDEX CONCURRENTLY {name}"))
            bind.execute(sa.text(f"ALTER INDEX {name}_0008 RENAME TO {name}"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # the two rebuilt indexes, without INCLUDE
        for name, columns in REBUILT.items():
            op.drop_index(name, table_name="citations")
            op.execute(f"CREATE INDEX {name} ON citations ({columns})")
    for name in INDEXES:
        op.drop_index(name, table_name="citations")
    op.drop_table("batch_domains")
    with op.batch_alter_table("citations") as batch:
        batch.drop_column("field_md5")
        batch.drop_column("created_at")
        batch.drop_column("confidence")
