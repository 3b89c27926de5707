"""pcq.db: what every engine is built with."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from pcq.db import make_engine


def test_a_database_error_never_shows_the_values_bound_to_its_statement(db_url: str) -> None:
    """A logged traceback carries the error's text: a secret bound to the statement (a webhook
    secret on its insert) must not be in it, on either backend. (PostgreSQL's own message
    names the key that clashed, as it must, so the secret here is in another column.)"""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE leak_probe (k TEXT PRIMARY KEY, v TEXT)"))
            conn.execute(text("INSERT INTO leak_probe VALUES ('a', :v)"), {"v": "whsec_do-not-show-me"})
        with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
            conn.execute(text("INSERT INTO leak_probe VALUES ('a', :v)"), {"v": "whsec_do-not-show-me"})
        assert "do-not-show-me" not in str(caught.value)
        assert "hidden due to hide_parameters" in str(caught.value)
    finally:
        engine.dispose()
