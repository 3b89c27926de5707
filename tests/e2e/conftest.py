"""The stack every end-to-end test can run on: PostgreSQL + Redis, and SQLite + the embedded broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, stack_env


@pytest.fixture(params=["postgres+redis", "sqlite+embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    if request.param == "postgres+redis":
        db = request.getfixturevalue("pg_url")
        env = stack_env(db, request.getfixturevalue("redis_url"))
    else:
        db = f"sqlite:///{tmp_path / 'pcq.sqlite3'}"
        env = stack_env(db, None)
        from migrations.migrate import upgrade_to_head

        upgrade_to_head(db)
    s = Stack(env, tmp_path)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        yield s, db
    finally:
        s.stop_all()
