"""The API's services: the rules of each request, run on pcq.repositories' statements.

Writes (``Submitter``): validate, commit the rows in one unit of work (``unit_of_work``), then
enqueue (never before the commit). Reads (the functions below it): scoped to a tenant (another
tenant's row is absent: 404), in the request's read session (api.deps.read_session, rolled back
at the end); they return models and rows, which api.views shapes into responses.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar, cast

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import control, intake
from api.batch_input import (
    JSONL_TYPES,
    JsonBatch,
    JsonlBatch,
    check_model,
    media_type,
    read_body,
    text_of,
)
from api.intake import BatchSource, DryRun, NewJob
from api.schemas import (
    DeliveryAttemptOut,
    DeliveryOut,
    DeliveryStatusName,
    EventTypeName,
    JobCreate,
    check_webhook_url,
    reuse_seconds,
)
from api.tenant_limits import QueueCap
from api.uploads import Spooled, UploadSlots, spool
from api.webhook_urls import WebhookUrlGuard
from pcq import costs
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import dispatch, lifecycle, outbox
from pcq.jobs.errors import InvalidInput, NotFound
from pcq.models import JOB_STATUSES, Batch, Citation, DeliveryStatus, Job, JobStatus, Priority, utcnow
from pcq.queue import DispatchWake, Enqueuer
from pcq.repositories import batches as batch_rows
from pcq.repositories import deliveries as delivery_rows
from pcq.repositories import jobs as job_rows
from pcq.repositories import results as result_rows
from pcq.repositories.jobs import ExportJob
from pcq.repositories.results import Answers, CitationFilter, DomainCount, ExportAnswers
from pcq.settings import ModelPrice, default_prices
from pcq.views import BatchOut, all_counts

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Submitter:
    sessions: SessionFactory
    # Wakes the dispatcher after jobs are queued; it, not the API, sends their messages, except
    # a single job's while the dispatcher says nothing waits (``direct`` sends it then).
    wake: DispatchWake
    max_batch_lines: int
    max_line_bytes: int
    direct: Enqueuer | None = None
    queue_cap: QueueCap = QueueCap()  # PCQ_TENANT_MAX_QUEUED, checked before each commit that queues jobs
    # PCQ_MAX_UPLOADS_PER_TENANT, PCQ_MAX_UPLOADS: batch bodies received or stored at once
    uploads: UploadSlots = field(default_factory=partial(UploadSlots, 4, 32))
    # The SSRF guard: a webhook_url must reach a public address (off: PCQ_WEBHOOK_ALLOW_PRIVATE)
    webhook_urls: WebhookUrlGuard = field(default_factory=WebhookUrlGuard)
    prices: dict[str, ModelPrice] = field(default_factory=default_prices)  # PCQ_PRICES: the estimates

    def submit_job(self, tenant_id: str, body: JobCreate, raw: bytes, idempotency_key: str | None) -> Job:
        """``body`` is ``raw`` validated; the request and metadata are stored as ``raw`` has them."""
        check_model(body.request.model)
        found = read_body(raw)
        item = NewJob(
            request_json=found["request"].text,
            model=body.request.model,
            stream=bool(body.request.stream),
            custom_id=body.custom_id,
            metadata_json=text_of(found, "metadata"),
            webhook_url=check_webhook_url(body.webhook_url),
            priority=body.priority,
            reuse_seconds=reuse_seconds(body.reuse),
        )
        self.webhook_urls.check(item.webhook_url)  # a lookup, before any transaction begins
        # Nothing waits for the quota and it has room to spare (the dispatcher says so): the
        # job skips the dispatcher's hop, as the fair order would send it at once anyway.
        direct = self.direct is not None and self.wake.is_open()
        with unit_of_work(self.sessions) as session:
            # A tenant with a max_share is counted against it by the dispatcher: never direct.
            direct = direct and not dispatch.capped(session, tenant_id)
            job, created = intake.create_job(session, tenant_id, item, idempotency_key, sent=direct)
            self.queue_cap.check(session, tenant_id, int(created))
        if created:
            log.info("job accepted", extra={"job_id": job.id, "model": job.model})
            if direct:
                self._send_now(job.id)
            self.wake()  # to count it, or to send it if it could not be sent here
        else:
            log.info("job replayed (Idempotency-Key)", extra={"job_id": job.id})
        return job

    def _send_now(self, job_id: str) -> None:
        assert self.direct is not None
        if self.direct.enqueue([job_id]) < 1:  # the broker is away: the dispatcher sends it later
            with unit_of_work(self.sessions) as session:
                lifecycle.clear_enqueued(session, [job_id])

    async def submit_batch(
        self,
        tenant_id: str,
        chunks: AsyncIterator[bytes],
        content_type: str,
        idempotency_key: str | None,
        priority: Priority | None = None,
        max_cost: float | None = None,
        reuse: int | None = None,
    ) -> tuple[Batch, bool]:
        """A batch from a request body, JSONL or JSON (api.uploads): in one of the tenant's upload
        slots, the body is received whole (hashed, spooled to a temporary file) before any
        database work; then it is parsed and stored in a thread, request by request.
        ``priority`` (``?priority=``) and ``reuse`` (``?reuse=``, in seconds) are for its jobs
        that name none, unless a JSON body names the batch's own; so is ``max_cost``
        (``?max_cost=``) for the batch."""
        jsonl = _batch_media(content_type)
        with self.uploads.hold(tenant_id):
            body = await spool(chunks)
            return await run_in_threadpool(
                self._store_batch, tenant_id, body, jsonl, idempotency_key, priority, max_cost, reuse
            )

    async def dry_run_batch(
        self,
        tenant_id: str,
        chunks: AsyncIterator[bytes],
        content_type: str,
        priority: Priority | None = None,
        max_cost: float | None = None,
    ) -> DryRun:
        """A batch body received and validated exactly as ``submit_batch`` does (in an upload
        slot; every request read, the webhook URL checked), then its cost estimate: nothing is
        stored, no transaction begins. The tenant's queue cap is the real submission's."""
        jsonl = _batch_media(content_type)
        with self.uploads.hold(tenant_id):
            body = await spool(chunks)
            return await run_in_threadpool(self._dry_run, body, jsonl, priority, max_cost)

    def _dry_run(
        self, body: Spooled, jsonl: bool, priority: Priority | None, max_cost: float | None
    ) -> DryRun:
        with body.file:
            found = intake.dry_run(self._reader(body, jsonl, priority, max_cost), self.prices)
        self.webhook_urls.check(found.webhook_url)
        return found

    def _reader(
        self,
        body: Spooled,
        jsonl: bool,
        priority: Priority | None,
        max_cost: float | None,
        reuse: int | None = None,
    ) -> BatchSource:
        kind = JsonlBatch if jsonl else JsonBatch
        return kind(body.file, self.max_batch_lines, self.max_line_bytes, priority, max_cost, reuse)

    def _store_batch(
        self,
        tenant_id: str,
        body: Spooled,
        jsonl: bool,
        idempotency_key: str | None,
        priority: Priority | None,
        max_cost: float | None = None,
        reuse: int | None = None,
    ) -> tuple[Batch, bool]:
        """Validate and insert the spooled body inside one transaction; commit only if every
        request was good. The transaction begins with the first rows to insert, so a body that
        is refused early never takes a database connection."""
        fingerprint = intake.batch_fingerprint(body.sha256, priority, max_cost, reuse)
        with body.file:
            if idempotency_key is not None:
                with self.sessions() as session:
                    replay = intake.replayed_batch(session, tenant_id, idempotency_key, fingerprint)
                if replay is not None:
                    log.info("batch replayed (Idempotency-Key)", extra={"batch_id": replay.id})
                    return replay, False
            reader = self._reader(body, jsonl, priority, max_cost, reuse)
            # The session takes a connection (and begins) only at the first insert.
            with unit_of_work(self.sessions) as session:
                stored = intake.create_batch(
                    session,
                    tenant_id,
                    reader,
                    idempotency_key=idempotency_key,
                    fingerprint=fingerprint,
                    prices=self.prices,
                )
                if stored.created:  # a JSON batch may name its webhook_url after its requests
                    self.webhook_urls.check(stored.batch.webhook_url)
                self.queue_cap.check(session, tenant_id, stored.total)
        if stored.created:
            log.info("batch accepted", extra={"batch_id": stored.batch.id, "jobs": stored.total})
            self.wake()
        else:
            log.info("batch replayed (Idempotency-Key)", extra={"batch_id": stored.batch.id})
        return stored.batch, stored.created

    def cancel_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            return control.cancel(session, get_job(session, tenant_id, job_id))

    def redeliver(self, tenant_id: str, event_id: str) -> None:
        """Deliver the tenant's webhook event again, now; another tenant's event is a 404."""
        with unit_of_work(self.sessions) as session:
            event = delivery_rows.event_of_tenant(session, tenant_id, event_id)
            if event is None:
                raise NotFound(f"no webhook delivery {event_id!r}")
            outbox.redeliver(session, event, now=utcnow())

    def retry_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            job = control.retry(session, get_job(session, tenant_id, job_id))
            self.queue_cap.check(session, tenant_id, 1)
        self.wake()
        return job

    def retry_failed(self, tenant_id: str, batch_id: str) -> tuple[Batch, int]:
        with unit_of_work(self.sessions) as session:
            batch = get_batch(session, tenant_id, batch_id)
            requeued = control.retry_failed(session, batch_id)
            self.queue_cap.check(session, tenant_id, len(requeued))
        if requeued:
            self.wake()
        return batch, len(requeued)


def _batch_media(content_type: str) -> bool:
    """Whether a batch body is JSONL (else JSON); any other Content-Type is refused."""
    ctype = media_type(content_type)
    if ctype not in JSONL_TYPES and ctype != "application/json":
        raise InvalidInput("Content-Type must be application/x-ndjson (JSONL) or application/json")
    return ctype in JSONL_TYPES


# --- reads


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = job_rows.get(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = batch_rows.get(session, tenant_id, batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return batch


def answers_of(session: Session, job: Job) -> Answers | None:
    """The stored answer of a job that succeeded (None for any other status)."""
    return result_rows.answers_of(session, [job.id]) if job.status == JobStatus.SUCCEEDED else None


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    status: str | None,
    batch_id: str | None,
    custom_id: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, and the cursor of the next page (if any)."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(JOB_STATUSES)}")
    before = decode_cursor(cursor) if cursor is not None else None
    rows = job_rows.newest_first(
        session,
        tenant_id,
        status=status,
        batch_id=batch_id,
        custom_id=custom_id,
        before=before,
        limit=limit + 1,
    )
    page = rows[:limit]
    return page, _next_cursor(page, more=len(rows) > limit, key=lambda job: job.id)


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """The batch's jobs per status, every status present."""
    return all_counts(job_rows.status_counts(session, batch_id))


def with_cost(session: Session, batch: Batch, out: BatchOut) -> BatchOut:
    """``out`` with the batch's token usage and its cost (pcq.costs.batch_cost)."""
    out.usage, out.cost = costs.batch_cost(session, batch.id, batch.estimated_cost)
    return out


def batch_position(session: Session, tenant_id: str, batch_id: str) -> int:
    """Jobs of other batches dispatched before the first of this (unstarted) batch's."""
    return dispatch.position(session, tenant_id, batch_id, now=utcnow())


EXPORT_READ_AHEAD = 2  # pages of an export read at once, each in a thread and a connection of its own
EXPORT_PAGE = 1000  # jobs per page of an export: ~5 MB of answers with 12 citations each


def batch_results(
    sessions: SessionFactory, batch_id: str, page: int = EXPORT_PAGE
) -> Iterator[tuple[Sequence[ExportJob], ExportAnswers]]:
    """The batch's jobs in submission order with the answers of those that succeeded, ``page``
    jobs at a time: keyset pages, each two index-range queries on PostgreSQL (four elsewhere),
    none per job.

    The answers of EXPORT_READ_AHEAD pages are read at once, in threads of their own, while the
    caller encodes the page before them: PostgreSQL builds the basis JSON (most of an export's
    CPU) on other cores meanwhile. Each read is a session of its own, closed before its page is
    handed on, so no transaction is held while the client reads (a slow reader would trip the
    idle-in-transaction timeout); an export holds at most EXPORT_READ_AHEAD + 1 connections.
    When the caller stops (the client went away: the generator is closed), the reads in flight
    end on their own and nothing further is read.
    """

    def jobs_after(after: str) -> Sequence[ExportJob]:
        with sessions() as session:
            return job_rows.page_of_batch(session, batch_id, after=after, limit=page)

    def answers_of_page(jobs: Sequence[ExportJob]) -> ExportAnswers:
        with sessions() as session:
            answers = result_rows.export_answers(session, batch_id, jobs[0][0], jobs[-1][0])
            session.rollback()
        return answers

    readers = ThreadPoolExecutor(max_workers=EXPORT_READ_AHEAD, thread_name_prefix="pcq-export")
    pending: deque[tuple[Sequence[ExportJob], Future[ExportAnswers]]] = deque()
    after: str | None = ""
    try:
        while True:
            while after is not None and len(pending) < EXPORT_READ_AHEAD:
                jobs = jobs_after(after)
                if not jobs:
                    after = None
                    break
                pending.append((jobs, readers.submit(answers_of_page, jobs)))
                after = jobs[-1][0]
            if not pending:
                return
            jobs, answers = pending.popleft()
            yield jobs, answers.result()
    finally:
        readers.shutdown(wait=False, cancel_futures=True)


CitationWith = tuple[Citation, str | None, str | None, str | None]  # custom_id, reasoning, confidence


def list_citations(
    session: Session, tenant_id: str, where: CitationFilter, *, cursor: str | None, limit: int
) -> tuple[list[CitationWith], str | None]:
    """A page of the tenant's citations, oldest first, and the cursor of the next page (if any).
    A job or batch named that is not the tenant's answers 404, not an empty page; a domain is
    matched as stored (lower case)."""
    if where.job_id is not None:
        get_job(session, tenant_id, where.job_id)
    if where.batch_id is not None:
        get_batch(session, tenant_id, where.batch_id)
    where = replace(
        where,
        domain=where.domain.lower() if where.domain is not None else None,
        created_after=_utc(where.created_after, "created_after"),
        created_before=_utc(where.created_before, "created_before"),
    )
    after = _int_cursor(cursor) if cursor is not None else None
    rows = result_rows.citations_of_tenant(session, tenant_id, where, after=after, limit=limit + 1)
    page: list[CitationWith] = [
        (c, custom_id, reasoning, confidence) for c, custom_id, reasoning, confidence in rows[:limit]
    ]
    return page, _next_cursor(page, more=len(rows) > limit, key=lambda row: row[0].id)


def batch_domains(
    session: Session, tenant_id: str, batch_id: str, *, cursor: str | None, limit: int
) -> tuple[list[DomainCount], str | None]:
    """The domains a tenant's batch cites, most cited first, a page at a time."""
    get_batch(session, tenant_id, batch_id)
    after = None
    if cursor is not None:
        count, sep, domain = decode_cursor(cursor).partition(":")
        if not sep:
            raise InvalidInput("cursor is not one this API returned")
        after = (_int_cursor(count, decoded=True), domain)
    rows = result_rows.domains_of_batch(session, batch_id, after=after, limit=limit + 1)
    page = rows[:limit]
    return page, _next_cursor(page, more=len(rows) > limit, key=lambda d: f"{d.citations}:{d.domain or ''}")


OUT_OF_RANGE = "must fall between years 1 and 9999 in UTC"


def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError as exc:  # an offset that moves the time out of datetime's range
        raise InvalidInput(f"{name} {OUT_OF_RANGE}") from exc


def _int_cursor(cursor: str, *, decoded: bool = False) -> int:
    """A cursor's number: ASCII digits, within a 64-bit column's range."""
    text = cursor if decoded else decode_cursor(cursor)
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise InvalidInput("cursor is not one this API returned")
    return int(text)


def _next_cursor(page: Sequence[T], *, more: bool, key: Callable[[T], str | int]) -> str | None:
    """The cursor after ``page`` when a row beyond it was read (pages ask for ``limit + 1``)."""
    return encode_cursor(key(page[-1])) if more and page else None


def encode_cursor(value: str | int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not one this API returned") from exc


# --- webhook deliveries


def list_deliveries(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None,
    batch_id: str | None,
    status: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[DeliveryOut], str | None]:
    """A page of the tenant's webhook events, oldest first, each with its attempts."""
    if job_id is not None:
        get_job(session, tenant_id, job_id)
    if batch_id is not None:
        get_batch(session, tenant_id, batch_id)
    after = None
    if cursor is not None:
        try:
            after = decode_cursor(cursor)
        except ValueError as exc:
            raise InvalidInput("cursor is not one this API returned") from exc
    rows = delivery_rows.events_of_tenant(
        session, tenant_id, job_id=job_id, batch_id=batch_id, status=status, after=after, limit=limit + 1
    )
    page = rows[:limit]
    attempts: dict[str, list[DeliveryAttemptOut]] = {e.id: [] for e in page}
    for a in delivery_rows.attempts_of(session, [e.id for e in page]):
        attempts[a.event_id].append(
            DeliveryAttemptOut(at=a.at, status_code=a.status_code, latency_ms=a.latency_ms, error=a.error)
        )
    shown = [
        DeliveryOut(
            id=e.id,
            type=cast(EventTypeName, e.type),
            url=e.url,
            status=cast(DeliveryStatusName, e.status),
            job_id=e.job_id,
            batch_id=e.batch_id,
            created_at=e.created_at,
            next_attempt_at=e.next_attempt_at if e.status == DeliveryStatus.PENDING else None,
            attempts=attempts[e.id],
        )
        for e in page
    ]
    return shown, _next_cursor(page, more=len(rows) > limit, key=lambda e: e.id)
