"""Authenticating an API key (pcq/tenants.py tenant_for_key) on SQLite and on the real
PostgreSQL: keys minted before the checksum still work, a typo is refused before any statement,
a well-formed wrong key gets one message whatever was wrong, an expired key is refused from its
expiry on, and last_used_at is written on first use and then at most once a minute."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text, update

from pcq.db import SQLITE_BUSY_TIMEOUT_MS, SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.keys import checksum, hash_secret
from pcq.models import ApiKey, Tenant, utcnow
from pcq.repositories.tenants import note_use
from pcq.tenants import (
    INVALID_KEY,
    LAST_USED_RESOLUTION,
    KeyRefused,
    authenticate,
    create_key,
    tenant_for_key,
)

PEPPER = "pepper"
TYPO = r"^malformed API key: its checksum does not match \(a typo\?\)$"


def new_key(sessions: SessionFactory, expires_at: datetime | None = None) -> tuple[str, str]:
    """(tenant id, plaintext key) of a key minted now."""
    with unit_of_work(sessions) as s:
        t, key = create_key(s, "acme", PEPPER, expires_at)
    return t.id, key


def legacy_key(sessions: SessionFactory) -> tuple[str, str]:
    """(tenant id, plaintext key) of a key as pcq minted them before the checksum."""
    prefix = secrets.token_hex(6)
    key = f"pcq_{prefix}_{secrets.token_urlsafe(24)}"
    with unit_of_work(sessions) as s:
        s.add(Tenant(id="ten_old", name="old"))
        s.flush()
        s.add(ApiKey(id="key_old", tenant_id="ten_old", prefix=prefix, key_hash=hash_secret(key, PEPPER)))
    return "ten_old", key


def use(sessions: SessionFactory, key: str, now: datetime | None = None) -> str:
    """Authenticate as api.deps does: in a session of its own, committed."""
    with unit_of_work(sessions) as s:
        return tenant_for_key(s, key, PEPPER, now or utcnow())


def refusal(sessions: SessionFactory, key: str, now: datetime | None = None) -> str:
    with pytest.raises(KeyRefused) as refused:
        use(sessions, key, now)
    return str(refused.value)


def with_secret(key: str, secret: str) -> str:
    body = key[: len("pcq_") + 13] + secret
    return body + checksum(body)


def test_a_key_minted_before_the_checksum_still_authenticates(sessions: SessionFactory) -> None:
    tenant, key = legacy_key(sessions)
    assert use(sessions, key) == tenant
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")  # no checksum to catch it: the hash does
    assert refusal(sessions, wrong) == INVALID_KEY


def test_a_typo_is_refused_for_its_checksum_without_a_single_statement(sessions: SessionFactory) -> None:
    _, key = new_key(sessions)
    typo = key[:25] + ("x" if key[25] != "x" else "y") + key[26:]
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    with sessions() as s:
        engine = s.get_bind()
        event.listen(engine, "before_cursor_execute", count)
        try:
            with pytest.raises(KeyRefused, match=TYPO):
                tenant_for_key(s, typo, PEPPER, utcnow())
            assert authenticate(s, key[:-1], PEPPER, utcnow()) is None  # cut short
            assert statements == []
            tenant_for_key(s, key, PEPPER, utcnow())
            assert statements  # the listener does hear a lookup
        finally:
            event.remove(engine, "before_cursor_execute", count)


def test_unknown_wrong_secret_and_revoked_keys_get_one_message(sessions: SessionFactory) -> None:
    _, key = new_key(sessions)
    unknown = with_secret(f"pcq_{secrets.token_hex(6)}_", key[17:-6])
    wrong_secret = with_secret(key, "A" * 32)
    assert refusal(sessions, unknown) == INVALID_KEY
    assert refusal(sessions, wrong_secret) == INVALID_KEY
    with unit_of_work(sessions) as s:
        s.execute(update(ApiKey).values(revoked_at=utcnow()))
    assert refusal(sessions, key) == INVALID_KEY


def test_an_expired_key_is_refused_from_its_expiry_on(sessions: SessionFactory) -> None:
    expires_at = utcnow() + timedelta(hours=1)
    tenant, key = new_key(sessions, expires_at=expires_at)
    assert use(sessions, key) == tenant
    assert use(sessions, key, expires_at - timedelta(microseconds=1)) == tenant
    said = refusal(sessions, key, expires_at)
    assert said.startswith("expired API key (since ")
    assert key[17:] not in said  # nor any of its secret
    assert refusal(sessions, with_secret(key, "A" * 32), expires_at) == INVALID_KEY  # only to its holder


def test_a_key_that_expired_before_it_was_used_is_refused(sessions: SessionFactory) -> None:
    _, key = new_key(sessions, expires_at=utcnow() - timedelta(seconds=1))
    assert refusal(sessions, key).startswith("expired API key")


def test_revoked_and_expired_says_revoked(sessions: SessionFactory) -> None:
    _, key = new_key(sessions, expires_at=utcnow() - timedelta(seconds=1))
    with unit_of_work(sessions) as s:
        s.execute(update(ApiKey).values(revoked_at=utcnow()))
    assert refusal(sessions, key) == INVALID_KEY


def last_used(sessions: SessionFactory) -> datetime | None:
    with sessions() as s:
        return s.scalars(select(ApiKey.last_used_at)).one()


def test_last_used_at_is_set_on_first_use_and_not_rewritten_within_a_minute(sessions: SessionFactory) -> None:
    _, key = new_key(sessions)
    assert last_used(sessions) is None
    t0 = utcnow()
    use(sessions, key, t0)
    assert last_used(sessions) == t0
    updates: list[str] = []

    def count(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("UPDATE"):
            updates.append(args[2])

    with sessions() as s:
        engine = s.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        for seconds in (1, 30, 60):  # a busy key: no write at all
            use(sessions, key, t0 + timedelta(seconds=seconds))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert updates == []
    assert last_used(sessions) == t0
    use(sessions, key, t0 + timedelta(seconds=61))
    assert last_used(sessions) == t0 + timedelta(seconds=61)


def test_a_newer_last_used_at_is_not_moved_back(sessions: SessionFactory) -> None:
    """A request that read the row before another recorded its use does not write again: the
    UPDATE's own condition holds, whatever the request read."""
    _, key = new_key(sessions)
    t0 = utcnow()
    use(sessions, key, t0)
    with unit_of_work(sessions) as s:
        key_id = s.scalars(select(ApiKey.id)).one()
        later = t0 + timedelta(seconds=1)
        assert note_use(s, key_id, now=later, older_than=later - LAST_USED_RESOLUTION) == 0
    assert last_used(sessions) == t0


def test_a_failed_last_used_write_accepts_the_key(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only database (a replica, say): the UPDATE fails, the key is accepted anyway, and the
    session can still be committed as api.deps commits it."""
    caplog.set_level(logging.DEBUG, logger="pcq.tenants")
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    try:
        tenant, key = new_key(sessions)
        with sessions() as s:
            if engine.dialect.name == "postgresql":
                s.execute(text("SET TRANSACTION READ ONLY"))
            else:
                s.connection().exec_driver_sql("PRAGMA query_only = ON")
            try:
                assert tenant_for_key(s, key, PEPPER, utcnow()) == tenant
                s.commit()
            finally:
                if engine.dialect.name != "postgresql":
                    s.connection().exec_driver_sql("PRAGMA query_only = OFF")
        assert last_used(sessions) is None
        assert "last_used_at of API key key_" in caplog.text  # the write did fail, and was let go
        assert key[17:] not in caplog.text
    finally:
        engine.dispose()


def test_a_held_lock_delays_authentication_by_a_moment_not_until_it_is_released(db_url: str) -> None:
    """Another transaction holds the key's row (PostgreSQL) or the write lock (SQLite, whose
    writers otherwise wait 30 s): the key is accepted after NOTE_USE_WAIT_MS, its use unrecorded,
    and the connection's own writers wait as long as ever afterwards."""
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    try:
        tenant, key = new_key(sessions)
        with engine.connect() as holder:
            if engine.dialect.name == "postgresql":
                holder.execute(text("SELECT 1 FROM api_keys FOR UPDATE"))
            else:
                holder.exec_driver_sql("BEGIN IMMEDIATE")
            started = time.monotonic()
            with sessions() as s:
                assert tenant_for_key(s, key, PEPPER, utcnow()) == tenant
                s.commit()
                if engine.dialect.name == "sqlite":
                    timeout = s.connection().exec_driver_sql("PRAGMA busy_timeout").scalar()
                    assert timeout == SQLITE_BUSY_TIMEOUT_MS
            assert time.monotonic() - started < 5  # not the 30 s a writer waits
            holder.rollback()
        assert last_used(sessions) is None
    finally:
        engine.dispose()
