"""Each tenant's webhook signing secrets (pcq/repositories/webhooks.py) on SQLite and on the
real PostgreSQL: created on first use, rotated with a grace period during which both sign,
isolated per tenant, and one current secret whatever the concurrency (PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.models import Tenant, WebhookSecret
from pcq.repositories import webhooks as repo
from pcq.webhooks import signed_headers

T0 = datetime(2026, 11, 29, 19, 0, tzinfo=UTC)
DAY = 86400
BODY = b'{"type": "job.succeeded", "data": {"id": "job_1"}}'


@pytest.fixture
def sessions(db_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with unit_of_work(factory) as s:
        s.add_all([Tenant(id="ten_a", name="a"), Tenant(id="ten_b", name="b")])
    yield factory
    engine.dispose()


def current(sessions: SessionFactory, tenant: str = "ten_a", now: datetime = T0) -> str:
    with unit_of_work(sessions) as s:
        return repo.current_secret(s, tenant, now=now)


def rotate(sessions: SessionFactory, now: datetime, grace: float = DAY, tenant: str = "ten_a") -> str:
    with unit_of_work(sessions) as s:
        return repo.rotate_secret(s, tenant, now=now, grace_seconds=grace)


def signing(sessions: SessionFactory, now: datetime, *tenants: str) -> dict[str, list[str]]:
    with unit_of_work(sessions) as s:
        return repo.signing_secrets(s, tenants or ("ten_a",), now=now)


def rows(sessions: SessionFactory, tenant: str = "ten_a") -> int:
    with sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(WebhookSecret).where(WebhookSecret.tenant_id == tenant))
            or 0
        )


def test_the_first_use_creates_the_secret_and_later_uses_return_it(sessions: SessionFactory) -> None:
    first = current(sessions)
    assert first.startswith("whsec_")
    assert current(sessions, now=T0 + timedelta(days=400)) == first
    assert rows(sessions) == 1


def test_rotation_makes_a_new_current_secret(sessions: SessionFactory) -> None:
    old = current(sessions)
    new = rotate(sessions, T0 + timedelta(hours=1))
    assert new != old
    assert current(sessions, now=T0 + timedelta(hours=2)) == new


def test_during_the_grace_period_both_secrets_sign_and_either_verifies(sessions: SessionFactory) -> None:
    old = current(sessions)
    new = rotate(sessions, T0, grace=DAY)
    keys = signing(sessions, T0 + timedelta(seconds=DAY - 1))
    assert keys == {"ten_a": [new, old]}
    headers = signed_headers(keys["ten_a"], "evt_1", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)


def test_after_the_grace_period_only_the_new_secret_signs(sessions: SessionFactory) -> None:
    old = current(sessions)
    new = rotate(sessions, T0, grace=DAY)
    keys = signing(sessions, T0 + timedelta(seconds=DAY))
    assert keys == {"ten_a": [new]}
    headers = signed_headers(keys["ten_a"], "evt_1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(BODY, headers)


def test_a_rotation_without_grace_stops_the_old_secret_at_once(sessions: SessionFactory) -> None:
    current(sessions)
    new = rotate(sessions, T0, grace=0)
    assert signing(sessions, T0) == {"ten_a": [new]}


def test_a_rotation_without_grace_also_stops_secrets_still_in_an_earlier_grace(
    sessions: SessionFactory,
) -> None:
    current(sessions)
    rotate(sessions, T0, grace=DAY)
    rotate(sessions, T0 + timedelta(minutes=1), grace=DAY)
    assert len(signing(sessions, T0 + timedelta(minutes=2))["ten_a"]) == 3
    newest = rotate(sessions, T0 + timedelta(minutes=3), grace=0)
    assert signing(sessions, T0 + timedelta(minutes=3))["ten_a"] == [newest]


def test_secrets_still_in_grace_sign_newest_first_and_at_most_four_beside_the_current(
    sessions: SessionFactory,
) -> None:
    made = [current(sessions)]
    for minute in range(1, 7):
        made.append(rotate(sessions, T0 + timedelta(minutes=minute)))
    keys = signing(sessions, T0 + timedelta(minutes=10))["ten_a"]
    assert keys == [made[6], made[5], made[4], made[3], made[2]]
    assert len(keys) == 1 + repo.MAX_SECRETS_IN_GRACE


def test_a_rotation_deletes_the_secrets_whose_grace_ended(sessions: SessionFactory) -> None:
    current(sessions)
    rotate(sessions, T0, grace=60)
    assert rows(sessions) == 2
    latest = rotate(sessions, T0 + timedelta(minutes=5), grace=60)
    assert rows(sessions) == 2  # the first is gone; the second is in its grace
    assert signing(sessions, T0 + timedelta(minutes=6))["ten_a"][0] == latest


def test_tenants_have_their_own_secrets(sessions: SessionFactory) -> None:
    a = current(sessions, "ten_a")
    b = current(sessions, "ten_b")
    assert a != b
    new_a = rotate(sessions, T0, tenant="ten_a")
    assert current(sessions, "ten_b") == b
    assert signing(sessions, T0, "ten_a", "ten_b") == {"ten_a": [new_a, a], "ten_b": [b]}


def test_signing_creates_a_secret_for_a_tenant_that_has_none(sessions: SessionFactory) -> None:
    keys = signing(sessions, T0, "ten_a", "ten_b", "ten_a")
    assert set(keys) == {"ten_a", "ten_b"}
    assert keys["ten_a"] == [current(sessions, "ten_a")]
    assert keys["ten_b"] == [current(sessions, "ten_b")]
    assert rows(sessions, "ten_a") == rows(sessions, "ten_b") == 1


def test_signing_leaves_out_a_tenant_id_that_names_no_tenant(sessions: SessionFactory) -> None:
    keys = signing(sessions, T0, "ten_a", "ten_gone")
    assert set(keys) == {"ten_a"}
    assert signing(sessions, T0, "ten_gone") == {}
    with sessions() as s:
        assert repo.signing_secrets(s, [], now=T0) == {}


def test_deleting_a_tenant_deletes_its_secrets(sessions: SessionFactory) -> None:
    current(sessions)
    rotate(sessions, T0)
    with unit_of_work(sessions) as s:
        s.delete(s.get(Tenant, "ten_a"))
    assert rows(sessions) == 0


# --- concurrency, on PostgreSQL (SQLite runs one writer at a time)


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    with unit_of_work(factory) as s:
        s.add(Tenant(id="ten_a", name="a"))
    yield factory
    engine.dispose()


def _overlapping(sessions: SessionFactory, first: object, second: object) -> tuple[str, str, float, float]:
    """Run ``first`` in a transaction left open 0.5 s after it ran, and ``second`` in another
    transaction started meanwhile: the interleaving of a race, made certain. Returns both
    results, when the first committed and when the second returned."""
    done = threading.Event()
    out: dict[str, object] = {}

    def run_first() -> None:
        with unit_of_work(sessions) as s:
            out["first"] = first(s)  # type: ignore[operator]
            done.set()
            time.sleep(0.5)
            out["committed"] = time.monotonic()

    thread = threading.Thread(target=run_first)
    thread.start()
    assert done.wait(10)
    with unit_of_work(sessions) as s:
        out["second"] = second(s)  # type: ignore[operator]
    out["returned"] = time.monotonic()
    thread.join(10)
    return out["first"], out["second"], out["committed"], out["returned"]  # type: ignore[return-value]


def test_two_first_uses_at_once_give_one_secret_on_postgres(pg_sessions: SessionFactory) -> None:
    first, second, committed, returned = _overlapping(
        pg_sessions,
        lambda s: repo.current_secret(s, "ten_a", now=T0),
        lambda s: repo.current_secret(s, "ten_a", now=T0),
    )
    assert second == first
    assert returned >= committed  # the second waited for the first's row, then read it
    assert rows(pg_sessions) == 1


def test_a_first_signing_and_a_first_read_at_once_agree_on_postgres(pg_sessions: SessionFactory) -> None:
    first, second, _, _ = _overlapping(
        pg_sessions,
        lambda s: repo.signing_secrets(s, ["ten_a"], now=T0)["ten_a"][0],
        lambda s: repo.current_secret(s, "ten_a", now=T0),
    )
    assert second == first
    assert rows(pg_sessions) == 1


def test_two_rotations_at_once_are_two_rotations_on_postgres(pg_sessions: SessionFactory) -> None:
    original = current(pg_sessions)
    first, second, committed, returned = _overlapping(
        pg_sessions,
        lambda s: repo.rotate_secret(s, "ten_a", now=T0, grace_seconds=DAY),
        lambda s: repo.rotate_secret(s, "ten_a", now=T0, grace_seconds=DAY),
    )
    assert len({original, first, second}) == 3
    assert returned >= committed
    assert current(pg_sessions) == second
    assert set(signing(pg_sessions, T0 + timedelta(hours=1))["ten_a"]) == {original, first, second}
    assert signing(pg_sessions, T0 + timedelta(hours=1))["ten_a"][0] == second
