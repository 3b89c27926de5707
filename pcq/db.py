"""Database engine and sessions, built once per process and passed in (never a global)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs for a job queue."""
    if url.startswith("sqlite"):
        # SQLite serialises writers; WAL lets readers (the API) run beside the writer and
        # busy_timeout makes a second writer wait instead of failing with "database is locked".
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive a PostgreSQL restart without a stale pool
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    kwargs["connect_args"] = _with_idle_timeout(url, dict(kwargs.get("connect_args") or {}))
    return create_engine(url, **kwargs)


# PostgreSQL ends a session left idle inside a transaction this long (a stuck request, a bug):
# its locks and its connection come back instead of being held until someone notices. No pcq
# transaction waits on anything but the database and its own CPU for anywhere near this long.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000


def _with_idle_timeout(url: str, connect_args: dict[str, Any]) -> dict[str, Any]:
    """``connect_args`` with ``-c idle_in_transaction_session_timeout=…`` added to the libpq
    ``options`` (after any given in the URL or the arguments, which keep theirs)."""
    setting = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    given = connect_args.get("options") or make_url(url).query.get("options") or ""
    if isinstance(given, tuple):  # a parameter repeated in the URL
        given = " ".join(given)
    if "idle_in_transaction_session_timeout" not in given:
        connect_args["options"] = f"{setting} {given}".strip()
    return connect_args


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: SessionFactory) -> Iterator[Session]:
    """The one place that commits: everything inside succeeds together or not at all."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def copy_rows(
    session: Session, table: str, columns: list[str], rows: list[list[Any]], json_columns: set[str]
) -> None:
    """Bulk-load rows into a PostgreSQL table with COPY, inside the session's transaction.

    COPY costs the client a tenth of an executemany INSERT per row (psycopg 3 sends one
    statement per row) and the server about half; see ops/bench/inserts.py.
    """
    import psycopg
    from psycopg.types.json import Jsonb

    dbapi = session.connection().connection.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    json_at = [i for i, c in enumerate(columns) if c in json_columns]
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    try:
        with dbapi.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                for i in json_at:
                    if row[i] is not None:
                        row[i] = Jsonb(row[i])
                copy.write_row(row)
    except psycopg.DataError as exc:
        # As SQLAlchemy reports it for statements it runs, so callers handle one error type.
        raise sqlalchemy.exc.DataError(sql, None, exc) from exc
