"""Shared fixtures: real PostgreSQL and Redis on 127.0.0.1 (required under CI=true), SQLite
files for fast unit tests, and an in-process mock upstream."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from aiohttp import web

from migrations.migrate import upgrade_to_head
from mock_upstream import MockConfig, create_app
from pcq.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs ``pcq`` in-process (shell.cli.main) configures logging for a process:
    a handler on the stderr pytest captures for that test and closes after it. Later tests'
    threads (the in-process mock) would then log to a closed file; put the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
# db 14 belongs to pcq's tests; TEST_REDIS_URL moves a second test run (another checkout running
# at the same time) to a db of its own, since every test empties its db when it ends.
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":  # read now: tests may set it
        pytest.fail(f"{reason} (CI=true: real-service tests must run, not skip)")
    pytest.skip(reason)


def require_redis(url: str = REDIS_TEST_URL) -> None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        _unavailable(f"Redis not reachable at {url}: {exc!r}")


@contextmanager
def empty_pg_database(prefix: str = "pcq_test", template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database (its SQLAlchemy URL), empty or a copy of ``template``,
    dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated to head once per session: each test gets a copy of it."""
    with empty_pg_database("pcq_tmpl") as url:
        upgrade_to_head(url)
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            # CREATE DATABASE ... TEMPLATE refuses a template anyone is connected to.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
        yield name


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """This test's own PostgreSQL database, a copy of the migrated template, dropped after it.

    Nothing one test leaves behind (an unfinished job a later test's sweeper would send, a
    tenant, a lease) can reach another, whatever order the tests run in.
    """
    with empty_pg_database(template=pg_template) as url:
        yield url


@pytest.fixture(scope="module")
def module_pg_url(pg_template: str) -> Iterator[str]:
    """One PostgreSQL database for a whole module (for fixtures that live that long)."""
    with empty_pg_database(template=pg_template) as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_redis()
    yield REDIS_TEST_URL
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()  # db 14 belongs to these tests alone
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pcq.sqlite3'}"
    upgrade_to_head(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pcq.sqlite3'}"
        upgrade_to_head(url)
        yield url
        return
    yield request.getfixturevalue("pg_url")


def make_settings(**env: Any) -> Settings:
    values = {k: str(v) for k, v in env.items() if v is not None}
    return load_settings(values)


@dataclass
class MockServer:
    url: str
    config: MockConfig


@pytest.fixture
def mock_upstream() -> Iterator[MockServer]:
    """The real mock upstream (aiohttp) on a free 127.0.0.1 port, in a background thread."""
    config = MockConfig(latency_ms=0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(create_app(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True
    )
    thread.start()
    assert ready.wait(10)
    yield MockServer(f"http://127.0.0.1:{state['port']}", config)
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
