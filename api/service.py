"""Submitting work: validate, commit the rows, then enqueue (never before the commit)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial

from starlette.concurrency import run_in_threadpool

from api import repository
from api.batch_input import (
    JSONL_TYPES,
    BatchBody,
    JsonBatch,
    JsonlBatch,
    check_model,
    media_type,
    read_body,
    text_of,
)
from api.schemas import JobCreate, check_webhook_url
from api.tenant_limits import QueueCap
from api.uploads import Spooled, UploadSlots, spool
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import control, lifecycle
from pcq.jobs.errors import InvalidInput
from pcq.jobs.intake import (
    NewJob,
    add_jobs,
    check_replay,
    close_batch,
    create_job,
    find_batch,
    open_batch,
)
from pcq.models import Batch, Job
from pcq.queue import Enqueuer


@dataclass
class Submitter:
    sessions: SessionFactory
    enqueuer: Enqueuer
    max_batch_lines: int
    max_line_bytes: int
    queue_cap: QueueCap = QueueCap()  # PCQ_TENANT_MAX_QUEUED, checked before each commit that queues jobs
    # PCQ_MAX_UPLOADS_PER_TENANT, PCQ_MAX_UPLOADS: batch bodies received or stored at once
    uploads: UploadSlots = field(default_factory=partial(UploadSlots, 4, 32))

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
        )
        with unit_of_work(self.sessions) as session:
            job, created = create_job(session, tenant_id, item, idempotency_key)
            self.queue_cap.check(session, tenant_id, int(created))
        if created:
            self._send([job.id])
        return job

    async def submit_batch(
        self, tenant_id: str, chunks: AsyncIterator[bytes], content_type: str, idempotency_key: str | None
    ) -> tuple[Batch, bool]:
        """A batch from a request body, JSONL or JSON (api.uploads): in one of the tenant's upload
        slots, the body is received whole (hashed, spooled to a temporary file) before any
        database work; then it is parsed and stored in a thread, request by request."""
        ctype = media_type(content_type)
        if ctype not in JSONL_TYPES and ctype != "application/json":
            raise InvalidInput("Content-Type must be application/x-ndjson (JSONL) or application/json")
        with self.uploads.hold(tenant_id):
            body = await spool(chunks)
            return await run_in_threadpool(
                self._store_batch, tenant_id, body, ctype in JSONL_TYPES, idempotency_key
            )

    def _store_batch(
        self, tenant_id: str, body: Spooled, jsonl: bool, idempotency_key: str | None
    ) -> tuple[Batch, bool]:
        """Validate and insert the spooled body inside one transaction; commit only if every
        request was good. The transaction begins with the first rows to insert, so a body that
        is refused early never takes a database connection."""
        with body.file:
            if idempotency_key is not None:
                with self.sessions() as session:
                    existing = find_batch(session, tenant_id, idempotency_key)
                if existing is not None:  # a replay: the very body the key was first used with
                    return check_replay(existing, body.sha256), False
            reader: BatchBody = (
                JsonlBatch(body.file, self.max_batch_lines, self.max_line_bytes)
                if jsonl
                else JsonBatch(body.file, self.max_batch_lines, self.max_line_bytes)
            )
            # The session takes a connection (and begins) only at the first insert.
            with unit_of_work(self.sessions) as session:
                batch: Batch | None = None
                total = 0
                sent: list[str] = []  # the ids to send, a string per chunk (a list of str costs 3x)
                for chunk in _in_chunks(reader.jobs()):
                    if batch is None:
                        batch = open_batch(
                            session,
                            tenant_id,
                            metadata_json=None,
                            webhook_url=None,
                            idempotency_key=idempotency_key,
                        )
                        if batch is None:  # a racing request took the key: compare bodies
                            assert idempotency_key is not None
                            winner = find_batch(session, tenant_id, idempotency_key)
                            assert winner is not None
                            return check_replay(winner, body.sha256), False
                    ids = add_jobs(session, batch, chunk)
                    total += len(ids)
                    sent.append(" ".join(ids))
                if batch is None:  # the readers refuse an empty batch; belt and braces
                    raise InvalidInput("the batch has no requests")
                # A JSON batch's own members may follow its requests: known only now.
                batch.metadata_json, batch.webhook_url = reader.metadata_json, reader.webhook_url
                close_batch(session, batch, total, body.sha256)
                self.queue_cap.check(session, tenant_id, total)
        ids = []
        for text in sent:
            ids += text.split(" ")
            if len(ids) >= CHUNK_JOBS:
                self._send(ids)
                ids = []
        if ids:
            self._send(ids)
        return batch, True

    def cancel_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            return control.cancel(session, repository.get_job(session, tenant_id, job_id))

    def retry_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            job = control.retry(session, repository.get_job(session, tenant_id, job_id))
            self.queue_cap.check(session, tenant_id, 1)
        self._send([job.id])
        return job

    def retry_failed(self, tenant_id: str, batch_id: str) -> tuple[Batch, int]:
        with unit_of_work(self.sessions) as session:
            batch = repository.get_batch(session, tenant_id, batch_id)
            requeued = control.requeue(session, control.failed_job_ids(session, batch_id))
            self.queue_cap.check(session, tenant_id, len(requeued))
        self._send(requeued)
        return batch, len(requeued)

    def _send(self, job_ids: list[str]) -> None:
        sent = self.enqueuer.enqueue(job_ids)
        if sent < len(job_ids):
            # The broker is unreachable; the jobs are durable. Mark them unsent so the next
            # sweep sends them instead of waiting for the lost-message timeout.
            with unit_of_work(self.sessions) as session:
                lifecycle.clear_enqueued(session, job_ids[sent:])


# Jobs are inserted in chunks of at most this many, or this many bytes of request and metadata
# text: what a batch holds in memory at once, beside the line being read.
CHUNK_JOBS = 2000
CHUNK_BYTES = 1 * 1024 * 1024


def _in_chunks(jobs: Iterator[NewJob]) -> Iterator[list[NewJob]]:
    chunk: list[NewJob] = []
    size = 0
    for job in jobs:
        chunk.append(job)
        size += len(job.request_json) + len(job.metadata_json or "")
        if len(chunk) >= CHUNK_JOBS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
