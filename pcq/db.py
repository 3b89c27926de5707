"""Database engine and sessions, built once per process and passed in (never a global)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]
SQLITE_BUSY_TIMEOUT_MS = 30_000  # a second SQLite writer waits this long for the first


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs for a job queue.

    Statement parameters are left out of every database error's text: an error logged with its
    traceback would otherwise show the values bound to the statement (a webhook secret on its
    insert, a request's text)."""
    kwargs.setdefault("hide_parameters", True)
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
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
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
