"""Alembic migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from migrations import compare_type, include_object_on
from migrations.migrate import alembic_config
from pcq.db import make_engine
from pcq.models import Base
from tests.conftest import empty_pg_database


# SQLite cannot reflect the md5 expression index that only PostgreSQL builds; include_object_on
# leaves it out there, after Alembic has said so.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_migrations_and_models_agree(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            opts = {"compare_type": compare_type, "include_object": include_object_on(conn.dialect.name)}
            ctx = MigrationContext.configure(conn, opts=opts)
            diff = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_0003_keeps_existing_requests_and_metadata_as_json_text() -> None:
    """Rows written as jsonb before revision 0003 read back as the same JSON, now as text."""
    request = {"model": "lite", "messages": [{"role": "user", "content": "é \u0001"}], "n": 10**20}
    with empty_pg_database("pcq_test_mig") as url:
        cfg = alembic_config(url)
        command.upgrade(cfg, "0002")
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', now())"))
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, request, model, stream, metadata, status, attempts,"
                    " attempts_base, created_at, updated_at) VALUES ('j', 't', CAST(:r AS jsonb), 'lite',"
                    " false, CAST(:m AS jsonb), 'queued', 0, 0, now(), now())"
                ),
                {"r": json.dumps(request), "m": json.dumps({"k": [1, 2]})},
            )
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            row = conn.execute(text("SELECT request, metadata, lease_losses FROM jobs")).one()
        engine.dispose()
        assert json.loads(row.request) == request
        assert json.loads(row.metadata) == {"k": [1, 2]}
        assert row.lease_losses == 0
        command.downgrade(cfg, "0002")  # and back: text that is JSON becomes jsonb again
