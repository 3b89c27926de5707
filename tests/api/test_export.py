"""``GET /v1/batches/{id}/results`` on SQLite and on the real PostgreSQL: every line says what
``GET /v1/jobs/{id}`` says of its job, whatever its status, across pages, and nothing of the
jobs of another batch (or tenant) whose ids fall between its own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import service, views
from api.app import create_app
from api.schemas import ExportLine
from pcq.db import SessionFactory, make_engine, make_session_factory, unit_of_work
from pcq.jobs.lifecycle import AttemptRecord
from pcq.models import Job, utcnow
from pcq.tenants import create_key_at
from pcq.views import ResultOut
from pcq.wire import BasisData, CitationData, ParsedCompletion
from tests.conftest import make_settings
from tests.core import lifecycle_helpers as one

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}


@dataclass
class Stored:
    http: TestClient
    key: str
    sessions: SessionFactory
    batch_id: str
    job_ids: dict[str, str]  # custom_id -> job id

    def h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _record(n: int, outcome: str) -> AttemptRecord:
    now = utcnow()
    return AttemptRecord(number=n, started_at=now, finished_at=now, outcome=outcome)


def _completion(i: int, *, usage: bool = True, basis: bool = True) -> ParsedCompletion:
    parsed = {"name": f"n{i}", "big": 10**20 + i, "nested": {"z": [1.5, None, True], "é": "✓"}}
    return ParsedCompletion(
        raw_body="{}",
        content=json.dumps(parsed, ensure_ascii=False) + ' \u2028 "quoted" \\',
        parsed=parsed,
        model="lite",
        finish_reason="stop",
        upstream_id=f"up{i}",
        usage={"prompt_tokens": i, "completion_tokens": 2 * i, "total_tokens": 3 * i} if usage else None,
        basis=[
            BasisData(
                field,
                f"because {field} {i}",
                "high" if pos else None,
                [
                    CitationData(f"https://ex{c}.example/{field}/{i}?q=ü", None if c == 1 else f"t{c}", None)
                    if c == 2
                    else CitationData(f"https://ex{c}.example/{field}/{i}", f"title {c}", [f"x{c}", "y é"])
                    for c in range(3)
                ],
            )
            for pos, field in enumerate(("name", "big", "nested"))
        ]
        if basis
        else [],
    )


def _succeed(sessions: SessionFactory, job_id: str, completion: ParsedCompletion) -> None:
    with unit_of_work(sessions) as s:
        job = one.claim(s, job_id, now=utcnow(), lease_seconds=60, max_attempts=3)
    assert job is not None
    with unit_of_work(sessions) as s:
        assert one.store_success(s, job, _record(job.attempt, "ok"), completion)


@pytest.fixture
def stored(db_url: str) -> Iterator[Stored]:
    """A batch of 9 jobs: answered (with and without usage and basis), failed, cancelled,
    queued; and, between its ids, an answered job of another tenant's batch."""
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as http:
        key = create_key_at(db_url, "acme")
        other_key = create_key_at(db_url, "globex")
        h = {"Authorization": f"Bearer {key}"}
        custom_ids = [f"c{i}" for i in range(9)]
        r = http.post(
            "/v1/batches", json={"requests": [{"custom_id": c, "body": REQ} for c in custom_ids]}, headers=h
        )
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        other = http.post(
            "/v1/batches",
            json={"requests": [{"custom_id": "c4", "body": REQ}]},
            headers={"Authorization": f"Bearer {other_key}"},
        ).json()
        jobs = http.get(f"/v1/jobs?batch_id={batch_id}&limit=100", headers=h).json()["data"]
        job_ids = {j["custom_id"]: j["id"] for j in jobs}
        sessions = make_session_factory(make_engine(db_url))

        for i in (0, 1, 5, 8):
            _succeed(sessions, job_ids[f"c{i}"], _completion(i))
        _succeed(sessions, job_ids["c2"], _completion(2, usage=False, basis=False))
        with unit_of_work(sessions) as s:
            bad = one.claim(s, job_ids["c3"], now=utcnow(), lease_seconds=60, max_attempts=3)
        assert bad is not None
        with unit_of_work(sessions) as s:
            one.store_failure(
                s, bad, _record(bad.attempt, "fatal"), code="bad_request", error="upstream said no"
            )
        assert http.post(f"/v1/jobs/{job_ids['c6']}/cancel", headers=h).status_code == 200

        # Another tenant's job whose id sorts between this batch's c4 and c5 (as two batches
        # submitted at the same moment would interleave), answered, citations and all.
        intruder = job_ids["c4"] + "x"  # a prefix sorts first: c4 < intruder < c5
        assert job_ids["c4"] < intruder < job_ids["c5"]
        with unit_of_work(sessions) as s:
            template = s.scalars(select(Job).where(Job.batch_id == other["id"])).one()
            s.add(
                Job(
                    id=intruder,
                    tenant_id=template.tenant_id,
                    batch_id=other["id"],
                    custom_id="intruder",
                    request_json=template.request_json,
                    model="lite",
                )
            )
        _succeed(sessions, intruder, _completion(99))
        yield Stored(http, key, sessions, batch_id, job_ids)


def _lines(stored: Stored) -> list[dict[str, Any]]:
    r = stored.http.get(f"/v1/batches/{stored.batch_id}/results", headers=stored.h())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    # Lines end with "\n" only: str.splitlines would also split at the U+2028 in a content.
    return [json.loads(line) for line in r.text.split("\n")[:-1]]


def test_every_export_line_says_what_get_job_says(stored: Stored) -> None:
    lines = _lines(stored)
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(9)]  # submission order
    ok, queued = "succeeded", "queued"
    assert [line["status"] for line in lines] == [ok, ok, ok, "failed", queued, ok, "cancelled", queued, ok]
    for line in lines:
        job = stored.http.get(f"/v1/jobs/{line['job_id']}", headers=stored.h()).json()
        assert line["custom_id"] == job["custom_id"]
        assert line["status"] == job["status"]
        if job["status"] == "succeeded":
            assert line["result"] == job["result"]
            assert list(line["result"]) == list(ResultOut.model_fields)
            assert "error" not in line
        elif job["error"] is not None:
            assert "result" not in line
            assert (line["error"], line["error_code"]) == (job["error"], job["error_code"])
        else:
            assert list(line) == ["custom_id", "job_id", "status"]
        ExportLine.model_validate(line)  # the documented schema
    answered = lines[0]["result"]
    assert answered["parsed"]["big"] == 10**20  # stored JSON spliced in: big integers intact
    assert [len(b["citations"]) for b in answered["basis"]] == [3, 3, 3]
    assert lines[2]["result"]["usage"] is None
    assert lines[2]["result"]["basis"] == []


def test_export_pages_join_up_and_leave_out_the_jobs_between_them(stored: Stored) -> None:
    whole = b"".join(views.export_lines(service.batch_results(stored.sessions, stored.batch_id)))
    for page in (1, 2, 4):  # every page boundary, and the other batch's job inside a page
        paged = b"".join(
            views.export_lines(service.batch_results(stored.sessions, stored.batch_id, page=page))
        )
        assert paged == whole
    text = whole.decode()
    assert "intruder" not in text
    assert "/99" not in text  # none of its answer's citations
    assert text.count("\n") == 9


def test_an_empty_page_set_yields_nothing_and_a_stopped_export_reads_no_further(stored: Stored) -> None:
    assert list(views.export_lines(service.batch_results(stored.sessions, "bat_none"))) == []
    pages = service.batch_results(stored.sessions, stored.batch_id, page=2)
    first_jobs, _ = next(pages)
    assert [j[1] for j in first_jobs] == ["c0", "c1"]
    pages.close()  # what Starlette's iterator does when the client goes away
    with pytest.raises(StopIteration):
        next(pages)


def test_an_export_reads_only_a_few_pages_ahead_of_its_reader(stored: Stored) -> None:
    """Memory stays flat: the reader gets a page while at most EXPORT_READ_AHEAD are read."""
    opened: list[int] = []

    def sessions() -> Any:
        opened.append(1)
        return stored.sessions()

    pages = service.batch_results(sessions, stored.batch_id, page=1)  # type: ignore[arg-type]  (a counting stand-in for the sessionmaker)
    next(pages)
    time.sleep(0.3)  # the reads in flight end
    assert len(opened) == 2 * service.EXPORT_READ_AHEAD  # each page: its jobs, then its answers
    assert len(list(pages)) == 8  # and the rest follow, one page per job
    pages.close()
