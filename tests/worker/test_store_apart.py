"""The writer stores a batch of outcomes whole, or, when the database refuses it, in halves, so one
outcome no column can hold fails its own job only. The real path (a citation URL over the btree
limit, through a real worker and PostgreSQL) is tests/e2e/test_unstorable.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg.errors
import pytest
from sqlalchemy.exc import DataError, OperationalError

from pcq.jobs.lifecycle import AttemptRecord, ClaimedJob, Settled
from pcq.wire import ParsedCompletion
from worker.engine import refused, store_apart


def item(n: int, *, poison: bool = False) -> Settled:
    job = ClaimedJob(f"job-{n}", "tenant", None, 1, "{}")
    now = datetime.now(UTC)
    record = AttemptRecord(1, now, now, "ok", status_code=200)
    model = "poison" if poison else "lite"
    return Settled(job, record, completion=ParsedCompletion("{}", "hi", None, model, "stop", None, None))


class Database:
    """Refuses any transaction that holds a poisoned answer, as PostgreSQL refuses a COPY."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.transactions: list[list[str]] = []
        self.stored: dict[str, str] = {}

    async def store(self, items: list[Settled]) -> set[str]:
        self.transactions.append([i.job.id for i in items])
        if any(i.completion is not None and i.completion.model == "poison" for i in items):
            raise self.error
        for i in items:
            self.stored[i.job.id] = "succeeded" if i.completion is not None else f"failed:{i.code}"
        return {i.job.id for i in items}


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.ProgramLimitExceeded("index row size 3040 exceeds btree version 4 maximum 2704"),
        DataError("COPY", {}, psycopg.errors.StringDataRightTruncation("value too long")),
        DataError("INSERT", {}, Exception("SQLite: string or blob too big")),
    ],
)
def test_one_refused_outcome_fails_its_own_job_only(error: BaseException) -> None:
    db = Database(error)
    items = [item(n, poison=n == 137) for n in range(200)]
    stored = asyncio.run(store_apart(db.store, items))
    assert stored.keys() == {f"job-{n}" for n in range(200)}
    # What is returned is what was stored: the refused answer's failure, in its place.
    assert (stored["job-137"].completion, stored["job-137"].code) == (None, "unstorable")
    assert all(stored[f"job-{n}"] is items[n] for n in range(200) if n != 137)
    assert db.stored["job-137"] == "failed:unstorable"
    assert all(db.stored[f"job-{n}"] == "succeeded" for n in range(200) if n != 137)
    # Halving: about 2·log2(200) transactions, not one per job.
    assert len(db.transactions) <= 2 * 8 + 2


def test_an_outage_is_not_split_but_raised_for_the_retry() -> None:
    outage = OperationalError("COPY", {}, psycopg.errors.AdminShutdown("terminating connection"))
    db = Database(outage)
    with pytest.raises(OperationalError):
        asyncio.run(store_apart(db.store, [item(1, poison=True), item(2)]))
    assert db.transactions == [["job-1", "job-2"]]


def test_refused_tells_a_bad_statement_from_an_outage() -> None:
    assert refused(psycopg.errors.ProgramLimitExceeded())
    assert refused(psycopg.errors.UniqueViolation())
    assert refused(DataError("x", {}, psycopg.errors.InvalidTextRepresentation()))
    assert not refused(OperationalError("x", {}, psycopg.errors.AdminShutdown()))
    assert not refused(OperationalError("x", {}, psycopg.errors.DeadlockDetected()))
    assert not refused(psycopg.OperationalError("connection refused"))
    assert not refused(ValueError("not a database error"))
