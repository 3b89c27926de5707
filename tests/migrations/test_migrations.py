"""Alembic migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from migrations import compare_type, include_object_on
from migrations.migrate import alembic_config
from pcq.db import make_engine, make_session_factory
from pcq.models import Base, BatchDomain, Citation
from pcq.repositories.results import text_md5
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


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_0008_fills_older_citations_and_counts_batch_domains(dialect: str, tmp_path: Path) -> None:
    """Citations stored before revision 0008 get their field's confidence and their answer's
    time (PostgreSQL: in chunks, here two, ids 1 and 30,000); each batch's domains are counted."""
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path / 'mig.sqlite3'}"
        else:
            url = stack.enter_context(empty_pg_database("pcq_test_mig"))
        cfg = alembic_config(url)
        command.upgrade(cfg, "0005")
        engine = make_engine(url)
        stack.callback(engine.dispose)
        stored = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

        def at(t: datetime) -> datetime:  # as the UTCDateTime column stores it (SQLite: naive UTC)
            return t if dialect == "postgres" else t.replace(tzinfo=None)

        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', :now)"),
                {"now": at(stored)},
            )
            conn.execute(
                text("INSERT INTO batches (id, tenant_id, total, created_at) VALUES ('b', 't', 2, :now)"),
                {"now": at(stored)},
            )
            for job, batch in (("j1", "b"), ("j2", "b"), ("j3", None)):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, tenant_id, batch_id, request, model, stream, status, attempts,"
                        " attempts_base, lease_losses, created_at, updated_at)"
                        " VALUES (:j, 't', :b, '{}', 'lite', false, 'succeeded', 1, 0, 0, :now, :now)"
                    ),
                    {"j": job, "b": batch, "now": at(stored)},
                )
                conn.execute(
                    text(
                        "INSERT INTO results (job_id, attempt_number, raw_body, created_at)"
                        " VALUES (:j, 1, '{}', :when)"
                    ),
                    {"j": job, "when": at(stored + timedelta(minutes=int(job[1])))},
                )
                conn.execute(
                    text(
                        "INSERT INTO basis_fields (job_id, position, field, confidence)"
                        " VALUES (:j, 0, 'f', :c)"
                    ),
                    {"j": job, "c": None if job == "j2" else "low"},
                )
            rows = [
                (1, "j1", "a.example"),
                (2, "j1", "a.example"),
                (30_000, "j2", "a.example"),
                (3, "j2", None),
            ]
            rows.append((4, "j3", "a.example"))
            for cid, job, domain in rows:
                conn.execute(
                    text(
                        "INSERT INTO citations (id, tenant_id, job_id, batch_id, field, field_position,"
                        " position, url, domain) VALUES (:id, 't', :j, :b, 'f', 0, :id, 'https://x', :d)"
                    ),
                    {"id": cid, "j": job, "b": None if job == "j3" else "b", "d": domain},
                )
        command.upgrade(cfg, "head")
        with make_session_factory(engine)() as s:
            got = {c.id: (c.confidence, c.created_at) for c in s.scalars(select(Citation))}
            counts = {(d.domain, d.citations, d.jobs) for d in s.scalars(select(BatchDomain))}
        assert got == {
            1: ("low", stored + timedelta(minutes=1)),
            2: ("low", stored + timedelta(minutes=1)),
            3: (None, stored + timedelta(minutes=2)),
            30_000: (None, stored + timedelta(minutes=2)),
            4: ("low", stored + timedelta(minutes=3)),
        }
        assert counts == {("a.example", 3, 2), ("", 1, 1)}  # j3 is in no batch
        with make_session_factory(engine)() as s:
            assert set(s.scalars(select(Citation.field_md5))) == {text_md5("f")}
        if dialect == "postgres":
            with engine.connect() as conn:
                invalid = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                        " WHERE c.relname LIKE 'ix_citations_%' AND NOT i.indisvalid"
                    )
                ).scalar_one()
            assert invalid == 0  # every index built CONCURRENTLY is usable
        command.downgrade(cfg, "0005")
