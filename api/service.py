"""Submitting work: validate, commit the rows, then enqueue (never before the commit)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update

from api import repository
from api.schemas import BatchCreate, BatchLine, JobCreate, check_webhook_url
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import control
from pcq.jobs.errors import InvalidInput, TooLarge
from pcq.jobs.intake import NewJob, create_batch, create_job
from pcq.models import Batch, Job
from pcq.queue import Enqueuer
from pcq.wire import KNOWN_MODELS


@dataclass
class Submitter:
    sessions: SessionFactory
    enqueuer: Enqueuer
    max_batch_lines: int

    def submit_job(self, tenant_id: str, body: JobCreate, idempotency_key: str | None) -> Job:
        request = body.request.model_dump(mode="json", exclude_none=True)
        _check_model(request)
        item = NewJob(
            request=request,
            custom_id=body.custom_id,
            metadata=body.metadata,
            webhook_url=check_webhook_url(body.webhook_url),
        )
        with unit_of_work(self.sessions) as session:
            job, created = create_job(session, tenant_id, item, idempotency_key)
        if created:
            self._send([job.id])
        return job

    def submit_batch(
        self, tenant_id: str, raw: bytes, content_type: str, idempotency_key: str | None
    ) -> tuple[Batch, bool]:
        items, metadata, webhook_url = parse_batch(raw, content_type, self.max_batch_lines)
        fingerprint = hashlib.sha256(raw).hexdigest()
        with unit_of_work(self.sessions) as session:
            batch, job_ids, created = create_batch(
                session,
                tenant_id,
                items,
                metadata=metadata,
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


def _check_model(request: dict[str, Any], where: str = "request") -> None:
    if request["model"] not in KNOWN_MODELS:
        raise InvalidInput(
            f"{where}.model: unknown model {request['model']!r}; use one of {', '.join(KNOWN_MODELS)}"
        )


def _describe(exc: ValidationError, where: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{where}: {loc}: {first['msg']}" if loc else f"{where}: {first['msg']}"


def _line_to_job(obj: Any, where: str) -> NewJob:
    try:
        line = BatchLine.model_validate(obj)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc, where)) from None
    request = line.body.model_dump(mode="json", exclude_none=True)
    _check_model(request, f"{where}: body")
    return NewJob(request=request, custom_id=line.custom_id, metadata=line.metadata)


def parse_batch(
    raw: bytes, content_type: str, max_lines: int
) -> tuple[list[NewJob], dict[str, Any] | None, str | None]:
    """Every line valid, or a 422 naming the first bad one; nothing is stored on error."""
    items: list[NewJob] = []
    labels: list[str] = []  # where each item came from, for error messages
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    ctype = content_type.split(";")[0].strip().lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("body is not valid UTF-8") from None
    if ctype in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if len(items) >= max_lines:
                raise TooLarge(f"a batch holds at most {max_lines} lines")
            try:
                obj = json.loads(line)
            except ValueError:
                raise InvalidInput(f"line {number}: not valid JSON") from None
            items.append(_line_to_job(obj, f"line {number}"))
            labels.append(f"line {number}")
    elif ctype == "application/json":
        try:
            body = BatchCreate.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidInput(_describe(exc, "body")) from None
        if len(body.requests) > max_lines:
            raise TooLarge(f"a batch holds at most {max_lines} requests")
        labels = [f"requests[{i}]" for i in range(len(body.requests))]
        items = [_line_to_job(obj, label) for obj, label in zip(body.requests, labels, strict=True)]
        metadata = body.metadata
        webhook_url = check_webhook_url(body.webhook_url)
    else:
        raise InvalidInput("Content-Type must be application/x-ndjson (JSONL) or application/json")
    if not items:
        raise InvalidInput("the batch has no requests")
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        assert item.custom_id is not None
        if item.custom_id in seen:
            raise InvalidInput(
                f"{labels[index]}: custom_id {item.custom_id!r} already used by "
                f"{labels[seen[item.custom_id]]}; it must be unique within the batch"
            )
        seen[item.custom_id] = index
    return items, metadata, webhook_url
