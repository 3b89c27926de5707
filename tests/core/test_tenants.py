"""Each tenant's share of the upstream quota (pcq/tenants.py, pcq/repositories/tenants.py) on
SQLite and on the real PostgreSQL: listed with its queued and running jobs in one statement, and
set only within range, on a tenant that exists."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select

from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.models import Job, JobStatus, Tenant
from pcq.tenants import InvalidShare, TenantShare, UnknownTenant, list_tenants, set_share

JOBS = {
    "ten_a": [JobStatus.QUEUED] * 4 + [JobStatus.RUNNING] * 2 + [JobStatus.SUCCEEDED, JobStatus.CANCELLED],
    "ten_b": [JobStatus.RUNNING, JobStatus.FAILED],
}


@pytest.fixture
def sessions(db_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with unit_of_work(factory) as s:
        s.add_all([Tenant(id="ten_b", name="b"), Tenant(id="ten_a", name="a"), Tenant(id="ten_c", name="c")])
        s.flush()
        s.add_all(
            Job(id=f"job_{tenant}_{n}", tenant_id=tenant, request_json="{}", model="lite", status=status)
            for tenant, statuses in JOBS.items()
            for n, status in enumerate(statuses)
        )
    yield factory
    engine.dispose()


def test_list_shows_every_tenant_by_name_with_its_queued_and_running_jobs_in_one_statement(
    sessions: SessionFactory,
) -> None:
    with unit_of_work(sessions) as s:
        set_share(s, "a", weight=5, max_share=0.5)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    with sessions() as s:
        engine = s.get_bind()
        event.listen(engine, "before_cursor_execute", count)
        try:
            shares = list_tenants(s)
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert shares == [
        TenantShare("a", 5, 0.5, queued=4, running=2),
        TenantShare("b", 1, 1.0, queued=0, running=1),
        TenantShare("c", 1, 1.0, queued=0, running=0),
    ]
    assert len(statements) == 1, statements


def test_set_keeps_what_it_is_not_given(sessions: SessionFactory) -> None:
    with unit_of_work(sessions) as s:
        assert set_share(s, "a", weight=3, max_share=None) == TenantShare("a", 3, 1.0)
    with unit_of_work(sessions) as s:
        assert set_share(s, "a", weight=None, max_share=0.2) == TenantShare("a", 3, 0.2)
    with sessions() as s:
        rows = s.execute(select(Tenant.name, Tenant.weight, Tenant.max_share).order_by(Tenant.name)).all()
    assert [tuple(r) for r in rows] == [("a", 3, 0.2), ("b", 1, 1.0), ("c", 1, 1.0)]


@pytest.mark.parametrize(
    ("weight", "max_share"),
    [(0, None), (1001, None), (None, 0.0), (None, 1.5), (None, float("inf")), (None, None)],
)
def test_set_refuses_a_value_out_of_range_before_reading_anything(
    sessions: SessionFactory, weight: int | None, max_share: float | None
) -> None:
    with sessions() as s, pytest.raises(InvalidShare):
        set_share(s, "no such tenant", weight=weight, max_share=max_share)  # the range, not the name


def test_set_refuses_an_unknown_tenant(sessions: SessionFactory) -> None:
    with sessions() as s, pytest.raises(UnknownTenant):
        set_share(s, "nope", weight=2, max_share=None)
