"""The stack every end-to-end test can run on: PostgreSQL + Redis, and SQLite + the embedded broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from migrations.migrate import upgrade_to_head
from tests.conftest import REDIS_TEST_URL, require_redis
from tests.stack import Stack, stack_env

BOTH_STACKS = ["postgres+redis", "sqlite+embedded"]


def stack_database(
    request: pytest.FixtureRequest, workdir: Path, pg_fixture: str = "pg_url"
) -> tuple[str, dict[str, str]]:
    """The database URL and environment of the stack ``request.param`` names (BOTH_STACKS):
    PostgreSQL (``pg_fixture``'s database) and Redis, or SQLite files in ``workdir`` and the
    embedded broker."""
    if request.param == "postgres+redis":
        db = request.getfixturevalue(pg_fixture)
        require_redis()
        return db, stack_env(db, REDIS_TEST_URL)
    db = f"sqlite:///{workdir / 'pcq.sqlite3'}"
    upgrade_to_head(db)
    return db, stack_env(db, None)


@pytest.fixture(params=BOTH_STACKS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    if request.param == "postgres+redis":
        request.getfixturevalue("redis_url")  # empties the tests' Redis db afterwards
    db, env = stack_database(request, tmp_path)
    s = Stack(env, tmp_path)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        yield s, db
    finally:
        s.stop_all()
