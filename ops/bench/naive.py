"""The naive peer: what a first Celery version of pcq would look like.

One Celery message per job (carrying the request), Celery's ``threads`` pool with
``-c 100``, a synchronous ``httpx.Client`` shared by the threads, and one ORM transaction
per job that loads the job, adds the result and one ORM object per citation, and marks the
job done. Same answers, same rows per job (1 result + 10 citations) as pcq and the ceiling,
in its own tables (``naive_*``) of the run's own database and on its own Redis database.

Configured by environment variables (the broker and queue at import, as a Celery app module
is; the database and upstream when the worker runs its first task)::

    NAIVE_DATABASE_URL  postgresql+psycopg://...
    NAIVE_BROKER_URL    redis://127.0.0.1:6379/11
    NAIVE_UPSTREAM_URL  the mock upstream
    NAIVE_QUEUE         the queue name

Run the worker with ``python -m celery -A ops.bench.naive worker --pool threads -c 100``.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Celery
from celery.signals import worker_ready
from sqlalchemy import JSON, DateTime, String, create_engine, insert
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ops.bench.tables import bench_tables, domain_of

JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


_, _results, _citations = bench_tables("naive", Base.metadata)


class NaiveJob(Base):
    __tablename__ = "naive_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class NaiveResult(Base):
    __table__ = _results


class NaiveCitation(Base):
    __table__ = _citations


QUEUE = os.environ.get("NAIVE_QUEUE", "naive-bench")
app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/11"))
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,  # at-least-once, like pcq
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@worker_ready.connect(weak=False)
def _announce(**_: Any) -> None:
    os.write(2, b"naive worker ready\n")  # the benchmark waits for this line in the log


_worker: dict[str, Any] = {}
_worker_lock = threading.Lock()


def _worker_state() -> tuple[sessionmaker[Session], httpx.Client]:
    """The worker's engine and HTTP client, built on first use (not in the bench driver)."""
    with _worker_lock:
        if not _worker:
            # One connection per 3 threads, kept open: a transaction is short, and an overflow
            # pool would open and close connections (a PostgreSQL backend each) all the time.
            engine = create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=30, max_overflow=0)
            _worker["sessions"] = sessionmaker(bind=engine, expire_on_commit=False)
            _worker["http"] = httpx.Client(
                base_url=os.environ["NAIVE_UPSTREAM_URL"],
                headers={"Authorization": "Bearer sk-bench", "x-api-key": "sk-bench"},
                timeout=httpx.Timeout(connect=10, read=360, write=60, pool=None),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
            )
        return _worker["sessions"], _worker["http"]


@app.task(name="naive.run_job", bind=True, max_retries=5)
def run_job(self: Any, job_id: str, request: dict[str, Any]) -> None:
    sessions, http = _worker_state()
    try:
        resp = http.post("/v1beta/chat/completions", json=request)
    except httpx.TransportError as exc:
        raise self.retry(exc=exc, countdown=1) from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise self.retry(countdown=1)
    data = resp.json()
    now = datetime.now(UTC)
    with sessions.begin() as session:
        job = session.get(NaiveJob, job_id)
        assert job is not None
        if resp.status_code != 200:
            job.status, job.finished_at = "failed", now
            return
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        session.add(
            NaiveResult(
                job_id=job_id,
                attempt_number=1,
                raw_body=resp.text,
                content=(choice.get("message") or {}).get("content"),
                model=data.get("model"),
                finish_reason=choice.get("finish_reason"),
                upstream_id=data.get("id"),
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                total_tokens=usage.get("total_tokens"),
                created_at=now,
            )
        )
        for fpos, basis in enumerate(data.get("basis") or []):
            for cpos, cite in enumerate(basis.get("citations") or []):
                session.add(
                    NaiveCitation(
                        tenant_id="bench",
                        job_id=job_id,
                        batch_id="naive",
                        field=basis.get("field"),
                        field_position=fpos,
                        position=cpos,
                        url=cite.get("url"),
                        domain=domain_of(cite.get("url") or ""),
                        title=cite.get("title"),
                        excerpts=cite.get("excerpts"),
                        reasoning=basis.get("reasoning"),
                        confidence=basis.get("confidence"),
                    )
                )
        job.status, job.finished_at = "succeeded", now


def create_tables(database_url: str) -> None:
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    engine.dispose()


def submit(database_url: str, job_requests: list[tuple[str, dict[str, Any]]]) -> None:
    """The peer's intake: insert the jobs (1,000 per statement), then one message per job."""
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    with sessionmaker(bind=engine).begin() as session:
        for start in range(0, len(job_requests), 1000):
            chunk = job_requests[start : start + 1000]
            session.execute(
                insert(NaiveJob),
                [{"id": i, "request": r, "status": "queued", "created_at": now} for i, r in chunk],
            )
    engine.dispose()
    with app.producer_or_acquire() as producer:
        for job_id, request in job_requests:
            run_job.apply_async(args=(job_id, request), producer=producer, queue=QUEUE)
