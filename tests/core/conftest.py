"""Fixtures of the core's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pcq.db import SessionFactory, make_engine, make_session_factory


@pytest.fixture
def sessions(db_url: str) -> Iterator[SessionFactory]:
    """Sessions on the test's database (SQLite and PostgreSQL: ``db_url``)."""
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()
