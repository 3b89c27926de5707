"""Submitting work: validate, commit the rows, then enqueue (never before the commit)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from sqlalchemy import update
from starlette.concurrency import run_in_threadpool

from api import repository
from api.batch_input import (
    JSONL_TYPES,
    JsonlReader,
    check_model,
    media_type,
    parse_json_batch,
    read_body,
    text_of,
)
from api.schemas import JobCreate, check_webhook_url
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import control
from pcq.jobs.errors import InvalidInput
from pcq.jobs.intake import (
    NewJob,
    add_jobs,
    check_replay,
    close_batch,
    create_batch,
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
        if created:
            self._send([job.id])
        return job

    async def submit_batch(
        self, tenant_id: str, chunks: AsyncIterator[bytes], content_type: str, idempotency_key: str | None
    ) -> tuple[Batch, bool]:
        """A batch from a request body as it streams in (JSONL) or whole (JSON)."""
        ctype = media_type(content_type)
        if ctype in JSONL_TYPES:
            return await self._submit_jsonl(tenant_id, chunks, idempotency_key)
        if ctype != "application/json":
            raise InvalidInput("Content-Type must be application/x-ndjson (JSONL) or application/json")
        raw = b"".join([chunk async for chunk in chunks])
        return await run_in_threadpool(self._submit_json, tenant_id, raw, idempotency_key)

    async def _submit_jsonl(
        self, tenant_id: str, chunks: AsyncIterator[bytes], idempotency_key: str | None
    ) -> tuple[Batch, bool]:
        """Validate and insert line by line inside one transaction; commit only if all were good."""
        hasher = hashlib.sha256()
        session = self.sessions()
        try:
            existing = None
            if idempotency_key:
                existing = await run_in_threadpool(find_batch, session, tenant_id, idempotency_key)
            batch = None
            if existing is None:
                batch = await run_in_threadpool(
                    partial(
                        open_batch,
                        session,
                        tenant_id,
                        metadata_json=None,
                        webhook_url=None,
                        idempotency_key=idempotency_key,
                    )
                )
            if batch is None:  # a replay, or a racing request took the key: compare bodies
                assert idempotency_key is not None
                async for chunk in chunks:
                    hasher.update(chunk)
                existing = existing or await run_in_threadpool(
                    find_batch, session, tenant_id, idempotency_key
                )
                assert existing is not None
                return check_replay(existing, hasher.hexdigest()), False
            reader = JsonlReader(self.max_batch_lines, self.max_line_bytes)
            ids: list[str] = []
            pending: list[NewJob] = []
            async for chunk in chunks:
                hasher.update(chunk)
                pending.extend(reader.feed(chunk))
                if len(pending) >= 2000:
                    ids += await run_in_threadpool(add_jobs, session, batch, pending)
                    pending = []
            pending.extend(reader.finish())
            ids += await run_in_threadpool(add_jobs, session, batch, pending)
            await run_in_threadpool(close_batch, session, batch, len(ids), hasher.hexdigest())
            await run_in_threadpool(session.commit)
        except BaseException:
            await run_in_threadpool(session.rollback)
            raise
        finally:
            await run_in_threadpool(session.close)
        await run_in_threadpool(self._send, ids)
        return batch, True

    def _submit_json(self, tenant_id: str, raw: bytes, idempotency_key: str | None) -> tuple[Batch, bool]:
        items, metadata_json, webhook_url = parse_json_batch(raw, self.max_batch_lines)
        fingerprint = hashlib.sha256(raw).hexdigest()
        with unit_of_work(self.sessions) as session:
            batch, job_ids, created = create_batch(
                session,
                tenant_id,
                items,
                metadata_json=metadata_json,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
        if created:
            self._send(job_ids)
        return batch, created

    def cancel_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            return control.cancel(session, repository.get_job(session, tenant_id, job_id))

    def retry_job(self, tenant_id: str, job_id: str) -> Job:
        with unit_of_work(self.sessions) as session:
            job = control.retry(session, repository.get_job(session, tenant_id, job_id))
        self._send([job.id])
        return job

    def retry_failed(self, tenant_id: str, batch_id: str) -> tuple[Batch, int]:
        with unit_of_work(self.sessions) as session:
            batch = repository.get_batch(session, tenant_id, batch_id)
            requeued = control.requeue(session, control.failed_job_ids(session, batch_id))
        self._send(requeued)
        return batch, len(requeued)

    def _send(self, job_ids: list[str]) -> None:
        sent = self.enqueuer.enqueue(job_ids)
        if sent < len(job_ids):
            # The broker is unreachable; the jobs are durable. Mark them unsent so the next
            # sweep sends them instead of waiting for the lost-message timeout.
            unsent = job_ids[sent:]
            with unit_of_work(self.sessions) as session:
                for start in range(0, len(unsent), 1000):
                    session.execute(
                        update(Job)
                        .where(Job.id.in_(unsent[start : start + 1000]))
                        .values(enqueued_at=None)
                        .execution_options(synchronize_session=False)
                    )
