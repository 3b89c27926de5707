"""Fixtures the fault tests share: their own redis-server or PostgreSQL cluster, and a reader of
the database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from migrations.migrate import upgrade_to_head
from tests.faults.helpers import Db, PrivatePostgres, PrivateRedis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server on a free port that the test may flush, kill and restart."""
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.kill()


@pytest.fixture
def db(pg_url: str) -> Iterator[Db]:
    d = Db(pg_url)
    yield d
    d.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL 15 cluster of the test's own, migrated, that it may restart and stop."""
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        upgrade_to_head(pg.url)
        yield pg
    finally:
        pg.cleanup()
