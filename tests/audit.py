"""Audit the rows a run of the real processes (``tests.stack.Stack``) wrote, independently
of the code that wrote them: counts per table, and the citations counted again from the raw
bodies. Used by the end-to-end and fault tests, and by ops/bench to check a benchmark's run."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import func, select

from pcq.db import make_engine, make_session_factory
from pcq.models import Attempt, Citation, Job, Result, Usage
from pcq.wire import iter_sse_data


def basis_citations_in_raw(raw: str) -> int:
    """Count citations in a stored raw body independently of the worker's parser."""
    if raw.lstrip().startswith("data:"):
        seen: set[str] = set()
        total = 0
        for data in iter_sse_data(raw):
            if data.strip() == "[DONE]":
                continue
            for entry in json.loads(data).get("basis") or []:
                key = json.dumps(entry, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    total += len(entry.get("citations") or [])
        return total
    return sum(len(b.get("citations") or []) for b in json.loads(raw).get("basis") or [])


@dataclass
class Audit:
    jobs: int
    by_status: dict[str, int]
    results: int
    usage: int
    citations: int
    citations_in_raw: int
    attempts: int
    attempts_claimed: int
    duplicate_results: int


def audit(database_url: str, batch_id: str) -> Audit:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as s:
            jobs = list(s.scalars(select(Job).where(Job.batch_id == batch_id)))
            ids = [j.id for j in jobs]
            by_status: dict[str, int] = {}
            for j in jobs:
                by_status[j.status] = by_status.get(j.status, 0) + 1
            results = list(s.scalars(select(Result).where(Result.job_id.in_(ids))))
            return Audit(
                jobs=len(jobs),
                by_status=by_status,
                results=len(results),
                usage=s.scalar(select(func.count()).select_from(Usage).where(Usage.job_id.in_(ids))) or 0,
                citations=s.scalar(
                    select(func.count()).select_from(Citation).where(Citation.batch_id == batch_id)
                )
                or 0,
                citations_in_raw=sum(basis_citations_in_raw(r.raw_body) for r in results),
                attempts=s.scalar(select(func.count()).select_from(Attempt).where(Attempt.job_id.in_(ids)))
                or 0,
                attempts_claimed=sum(j.attempts for j in jobs),
                duplicate_results=len(results) - len({r.job_id for r in results}),
            )
    finally:
        engine.dispose()
