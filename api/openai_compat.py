"""OpenAI-compatible Files and Batches (``/openai/v1``): views over pcq's own batches and jobs.

A batch created here is an ordinary pcq batch (api.intake, the same path as a JSONL batch of
``POST /v1/batches``): the dispatcher runs it, its citations are rows, ``/v1/batches`` shows it.
What the OpenAI batch object adds is kept on the batch (input file, endpoint, window, the
errors that failed it, when a cancel was asked for); everything else is derived from its jobs'
counts when it is read. Its output and error files are not stored: they are generated from the
stored answers when downloaded, each upstream body spliced in as its stored text.

Errors under ``/openai/v1`` are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}`` (``OpenAIErrors`` rewrites the API's own), so the OpenAI SDK raises its typed
exceptions; a request the API would answer 422 is OpenAI's 400.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import control, intake, schemas
from api.batch_input import describe, members_to_job
from api.intake import NewJob
from api.service import Submitter
from api.verbatim import Member, NotJson, decode_utf8, members
from pcq import costs
from pcq.db import SessionFactory, unit_of_work
from pcq.jobs.errors import InvalidInput
from pcq.models import Batch, File, JobStatus, Priority, new_id, utcnow
from pcq.repositories import jobs as job_rows
from pcq.repositories import openai as rows
from pcq.repositories.openai import OutputJob
from pcq.views import BatchCost, BatchUsage, all_counts, batch_done
from pcq.wire import KNOWN_MODELS

PREFIX = "/openai/v1"
ENDPOINT = "/v1/chat/completions"  # the one endpoint a batch may name (Parallel's Chat Completions)
COMPLETION_WINDOW = "24h"  # the only window OpenAI accepts; pcq has none (a batch runs until done)
PURPOSE = "batch"
MAX_ERRORS = 100  # validation errors reported for a bad input file (the first ones, by line)
OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


# --- errors


class OpenAIError(Exception):
    """An error answered in OpenAI's shape (``param`` names the input at fault)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def shown(text: str) -> str:
    """Text safe to answer in JSON: an unpaired surrogate (from a key or value that was sent)
    shown as its escape, since no UTF-8 answer can hold one."""
    return text.encode("utf-8", "backslashreplace").decode()


def error_json(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    message, param = shown(message), None if param is None else shown(param)
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(what: str, object_id: str) -> OpenAIError:
    return OpenAIError(404, f"No such {what}: {object_id!r}", code="not_found")


class OpenAIErrors:
    """Under ``/openai/``, rewrite the API's error bodies ``{"error": code, "detail": message}``
    (whoever answered them: a route, the authentication, the body limit, the rate limiter) into
    OpenAI's shape; 422 becomes 400, as OpenAI answers invalid input. Other answers pass as they
    are, without being buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/openai/"):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._rewritten(send, start, b"".join(body))

        await self.app(scope, receive, rewriting_send)

    @staticmethod
    async def _rewritten(send: Send, start: Message, raw: bytes) -> None:
        status = start["status"]
        headers = [
            (k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")
        ]
        try:
            found = json.loads(raw)
        except ValueError:
            found = None
        if isinstance(found, dict) and isinstance(found.get("error"), str):
            status = 400 if status == 422 else status
            raw = json.dumps(error_json(status, str(found.get("detail", "")), None, found["error"])).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})


def install(app: FastAPI) -> None:
    """OpenAI-shaped errors under ``/openai/``: this module's own, and the API's rewritten."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(error_json(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)

    app.add_middleware(OpenAIErrors)


# --- files


def unix(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


def file_object(file: File) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.size,
        "created_at": unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def new_file_id() -> str:
    return "file-" + new_id("f").split("_", 1)[1]


def check_upload(purpose: object, filename: str | None) -> str:
    """The stored name of an upload, once its purpose is ``batch`` (400 otherwise)."""
    if purpose is None:
        raise OpenAIError(400, "purpose is required; it must be 'batch'", param="purpose", code="missing")
    if purpose != PURPOSE:
        raise OpenAIError(
            400,
            f"purpose {purpose!r} is not supported: this service takes 'batch' files only",
            param="purpose",
        )
    name = filename or "upload.jsonl"
    if "\x00" in name or len(name) > 255 or shown(name) != name:
        raise OpenAIError(400, "the file's name must be at most 255 characters, without NUL", param="file")
    return name


def store_file(sessions: SessionFactory, tenant_id: str, filename: str, content: bytes) -> File:
    file = File(
        id=new_file_id(),
        tenant_id=tenant_id,
        purpose=PURPOSE,
        filename=filename,
        size=len(content),
        content=content,
        created_at=utcnow(),
    )
    with unit_of_work(sessions) as session:
        rows.add_file(session, file)
    return file


def output_file_of(file_id: str) -> tuple[str, bool] | None:
    """The batch id and kind (True: errors) of a generated output file's id, else None."""
    for suffix, errors in ((OUTPUT_SUFFIX, False), (ERRORS_SUFFIX, True)):
        if file_id.startswith("file-") and file_id.endswith(suffix):
            return file_id[len("file-") : -len(suffix)], errors
    return None


# --- batches: the input file


@dataclass
class InputFile:
    """An input file read line by line: its jobs, or the errors that fail the batch."""

    jobs: list[NewJob] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.errors.append({"code": code, "message": shown(message), "param": param, "line": line})


def read_input(content: bytes, *, max_lines: int, max_line_bytes: int) -> InputFile:
    """Validate every line of an OpenAI batch input file, as OpenAI does: each error names its
    line (1-based) and the parameter at fault; the first MAX_ERRORS are kept. A good line
    becomes a job whose request is its ``body``'s exact text (api.verbatim)."""
    out = InputFile()
    seen: dict[str, int] = {}
    count = 0
    for number, raw in enumerate(content.split(b"\n"), 1):
        if len(out.errors) >= MAX_ERRORS:
            break
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            out.fail(
                None, "too_many_requests", f"a batch holds at most {max_lines} requests (PCQ_MAX_BATCH_LINES)"
            )
            break
        if len(raw) > max_line_bytes:
            out.fail(number, "request_too_large", f"the line is longer than {max_line_bytes} bytes")
            continue
        job = _line(out, number, raw)
        if job is None:
            continue
        assert job.custom_id is not None
        first = seen.setdefault(job.custom_id, number)
        if first != number:
            out.fail(
                number,
                "duplicate_custom_id",
                f"custom_id {job.custom_id!r} is already used on line {first}; it must be unique in a batch",
                "custom_id",
            )
            continue
        out.jobs.append(job)
    if count == 0:
        out.fail(None, "empty_file", "the input file has no requests")
    return out


def _line(out: InputFile, number: int, raw: bytes) -> NewJob | None:
    try:
        found = members(decode_utf8(raw))
    except NotJson as exc:
        out.fail(number, "invalid_json_line", f"This line is not parseable as valid JSON: {exc}")
        return None
    checks: list[tuple[str, Any, str, str]] = [
        ("custom_id", str, "missing_required_parameter", "custom_id must be a string"),
        ("method", "POST", "invalid_method", "method must be POST"),
        ("url", ENDPOINT, "invalid_url", f"url must be {ENDPOINT}, the batch's endpoint"),
        ("body", dict, "invalid_body", "body must be a JSON object"),
    ]
    for key, expected, code, message in checks:
        value = _value(found.get(key))
        ok = isinstance(value, expected) if isinstance(expected, type) else value == expected
        if not ok:
            out.fail(number, code, message, key)
            return None
    body = found["body"].value
    if body.get("model") not in KNOWN_MODELS:
        out.fail(
            number, "model_not_found", f"body.model must be one of {', '.join(KNOWN_MODELS)}", "body.model"
        )
        return None
    if body.get("stream"):
        out.fail(number, "invalid_value", "a batch request cannot stream", "body.stream")
        return None
    try:
        return members_to_job(found, "")
    except InvalidInput as exc:
        out.fail(number, "invalid_request", exc.detail.removeprefix(": "), None)
        return None


def _value(member: Member | None) -> Any:
    return None if member is None else member.value


# --- batches: create, cancel


# output_expires_after is accepted and ignored: pcq keeps its answers until they are deleted.
BATCH_CREATE_KEYS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
# pcq's own options, as on POST /v1/batches (the SDK sends them with extra_body={...}).
PCQ_BATCH_OPTIONS = ("webhook_url", "webhook_events", "max_cost", "reuse", "priority")


@dataclass(frozen=True)
class BatchCreate:
    """``POST /openai/v1/batches``'s body, validated; ``metadata_json`` as given, verbatim."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata_json: str | None
    options: BatchOptions = field(default_factory=lambda: BatchOptions())

    @classmethod
    def read(cls, raw: bytes) -> BatchCreate:
        try:
            found = members(decode_utf8(raw))
        except NotJson as exc:
            raise OpenAIError(400, f"the body is not a JSON object: {exc}") from None
        unknown = set(found) - BATCH_CREATE_KEYS - set(PCQ_BATCH_OPTIONS)
        if unknown:
            name = sorted(unknown)[0]
            raise OpenAIError(400, f"Unrecognized request argument supplied: {name}", param=name)
        input_file_id = _value(found.get("input_file_id"))
        if not _is_id(input_file_id):
            raise OpenAIError(400, "input_file_id must be a file's id", param="input_file_id")
        if _value(found.get("endpoint")) != ENDPOINT:
            raise OpenAIError(400, f"endpoint must be {ENDPOINT}", param="endpoint", code="invalid_value")
        if _value(found.get("completion_window")) != COMPLETION_WINDOW:
            raise OpenAIError(
                400, "completion_window must be '24h'", param="completion_window", code="invalid_value"
            )
        metadata = found.get("metadata")
        if metadata is not None and metadata.value is not None:
            _check_metadata(metadata.value)
        return cls(
            input_file_id,
            ENDPOINT,
            COMPLETION_WINDOW,
            None if metadata is None or metadata.value is None else metadata.text,
            BatchOptions.read({k: found[k].value for k in PCQ_BATCH_OPTIONS if k in found}),
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and "\x00" not in value and shown(value) == value


def _check_metadata(value: Any) -> None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or any(len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in value.items())
        or shown(json.dumps(value, ensure_ascii=False)) != json.dumps(value, ensure_ascii=False)
    ):
        raise OpenAIError(
            400,
            "metadata must be an object of at most 16 pairs: keys up to 64 characters, "
            "string values up to 512, no unpaired surrogate",
            param="metadata",
        )


@dataclass(frozen=True)
class BatchOptions:
    """pcq's options on an OpenAI-style batch, checked as ``POST /v1/batches`` checks them: the
    batch's webhook (and the job events it also gets), its ``max_cost``, its jobs' ``reuse``
    window and priority."""

    webhook_url: str | None = None
    webhook_events: str | None = None  # JSON text, as api.batch_input keeps it
    max_cost: float | None = None
    reuse_seconds: int | None = None
    priority: Priority | None = None

    @classmethod
    def read(cls, given: dict[str, Any]) -> BatchOptions:
        if not given:
            return cls()
        try:
            body = schemas.BatchCreate.model_validate({"requests": [{}], **given})
        except ValidationError as exc:
            param = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise OpenAIError(400, describe(exc, "body"), param=param) from None
        try:
            url = schemas.check_webhook_url(body.webhook_url)
        except InvalidInput as exc:
            raise OpenAIError(400, str(exc), param="webhook_url") from None
        return cls(
            webhook_url=url,
            webhook_events=json.dumps(sorted(set(body.webhook_events))) if body.webhook_events else None,
            max_cost=body.max_cost,
            reuse_seconds=schemas.reuse_seconds(body.reuse),
            priority=body.priority if "priority" in given else None,
        )


class _Jobs:
    """The jobs of a validated input file, as an api.intake.BatchSource, with pcq's options."""

    def __init__(self, jobs: list[NewJob], metadata_json: str | None, options: BatchOptions) -> None:
        self._jobs = jobs
        self.metadata_json = metadata_json
        self.webhook_url = options.webhook_url
        self.webhook_events = options.webhook_events
        self.max_cost = options.max_cost
        self.reuse_seconds = options.reuse_seconds
        self.priority = options.priority

    def jobs(self) -> Iterator[NewJob]:
        return iter(self._jobs)


def create_batch(submitter: Submitter, tenant_id: str, body: BatchCreate) -> Batch:
    """Validate the input file whole, then store the batch: its jobs through api.intake (as a
    JSONL batch's), or, if any line is bad, the batch alone, failed, with the errors (no job)."""
    with submitter.sessions() as session:
        content = rows.content_of(session, tenant_id, body.input_file_id)
    if content is None:
        raise not_found("file", body.input_file_id)
    submitter.webhook_urls.check(body.options.webhook_url)  # the SSRF guard, as for /v1 batches
    read = read_input(content, max_lines=submitter.max_batch_lines, max_line_bytes=submitter.max_line_bytes)
    fingerprint = hashlib.sha256(content).hexdigest()
    del content
    with unit_of_work(submitter.sessions) as session:
        if read.errors:
            batch = Batch(
                id=new_id("bat"),
                tenant_id=tenant_id,
                total=0,
                metadata_json=body.metadata_json,
                request_hash=fingerprint,
                openai_errors=json.dumps(read.errors),
                created_at=utcnow(),
            )
            rows.add_batch(session, batch)
        else:
            source = _Jobs(read.jobs, body.metadata_json, body.options)
            stored = intake.create_batch(
                session,
                tenant_id,
                source,
                idempotency_key=None,
                fingerprint=fingerprint,
                prices=submitter.prices,
            )
            batch = stored.batch
            submitter.queue_cap.check(session, tenant_id, stored.total)
        rows.set_openai_fields(
            session,
            batch,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
        )
    if not read.errors:
        submitter.wake()
    return batch


def cancel_batch(sessions: SessionFactory, tenant_id: str, batch_id: str) -> Batch:
    """Cancel the batch's jobs not yet ended (api.control); a batch that has ended is a 409,
    one already cancelled answers as it is."""
    with unit_of_work(sessions) as session:
        batch = rows.openai_batch(session, tenant_id, batch_id)
        if batch is None:
            raise not_found("batch", batch_id)
        if batch.cancelling_at is None:
            counts = all_counts(job_rows.status_counts(session, batch.id))
            if batch.openai_errors is not None or batch_done(counts, batch.total):
                status = "failed" if batch.openai_errors is not None else "completed"
                raise OpenAIError(409, f"Cannot cancel a batch with status {status!r}", code="conflict")
            rows.request_cancel(session, batch, now=utcnow())
            control.cancel_batch(session, batch.id)
    return batch


# --- batches: what the OpenAI batch object shows


def batch_object(
    batch: Batch,
    counts: dict[str, int],
    finished_at: datetime | None,
    spend: tuple[BatchUsage, BatchCost] | None = None,
) -> dict[str, Any]:
    """The OpenAI batch object of a pcq batch (``counts``: its jobs per status, every status
    present; ``finished_at``: when its last job ended; ``spend``: its usage and cost,
    pcq.costs.batch_cost). ``usage`` is in OpenAI's shape (input/output tokens: the answers'
    prompt/completion tokens; no cached or reasoning tokens are reported upstream: 0), and
    ``cost`` (``estimated``, ``spent``, USD) is pcq's own field, as on ``GET /v1/batches/{id}``.

    Its status: ``failed`` if its input file was refused; once every job has ended,
    ``cancelled`` if a cancel was asked for, else ``completed`` (whatever failed, as OpenAI);
    before, ``cancelling`` or ``in_progress``. ``request_counts.failed`` counts the jobs that
    failed and those cancelled (OpenAI counts a request either completed or failed)."""
    failed = counts[JobStatus.FAILED] + counts[JobStatus.CANCELLED]
    out: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": "in_progress",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.created_at),
        "expires_at": None,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": None,
        "request_counts": {"total": batch.total, "completed": counts[JobStatus.SUCCEEDED], "failed": failed},
        "metadata": None if batch.metadata_json is None else json.loads(batch.metadata_json),
    }
    if spend is not None:
        usage, cost = spend
        out["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }
        out["cost"] = cost.model_dump()
    if batch.openai_errors is not None:
        out.update(
            status="failed",
            in_progress_at=None,
            failed_at=unix(batch.created_at),
            errors={"object": "list", "data": json.loads(batch.openai_errors)},
        )
        return out
    if not batch_done(counts, batch.total):
        if batch.cancelling_at is not None:
            out["status"] = "cancelling"
        return out
    ended = unix(finished_at or batch.cancelling_at or batch.created_at)
    out["output_file_id"] = f"file-{batch.id}{OUTPUT_SUFFIX}"
    if failed:
        out["error_file_id"] = f"file-{batch.id}{ERRORS_SUFFIX}"
    if batch.cancelling_at is not None:
        out.update(status="cancelled", cancelled_at=ended)
    else:
        out.update(status="completed", finalizing_at=ended, completed_at=ended)
    return out


def output_file_object(batch: Batch, errors: bool) -> dict[str, Any]:
    """A generated output (or error) file: ``bytes`` is 0, since it is made when downloaded."""
    return {
        "id": f"file-{batch.id}{ERRORS_SUFFIX if errors else OUTPUT_SUFFIX}",
        "object": "file",
        "bytes": 0,
        "created_at": unix(batch.created_at),
        "filename": f"batch_{batch.id}_{'error' if errors else 'output'}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


# --- output files

OUTPUT_PAGE = 1000
OUTPUT_STATUSES = (JobStatus.SUCCEEDED,)
ERROR_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)
CANCELLED_ERROR = {"code": "batch_cancelled", "message": "This request was cancelled before it completed."}


def output_pages(sessions: SessionFactory, batch_id: str, errors: bool) -> Iterator[list[OutputJob]]:
    """The batch's jobs for its output (or error) file, a page at a time, each page read in a
    session of its own (none is held while the client reads)."""
    statuses = ERROR_STATUSES if errors else OUTPUT_STATUSES
    after = ""
    while True:
        with sessions() as session:
            page = rows.output_page(session, batch_id, statuses, after=after, limit=OUTPUT_PAGE)
        if not page:
            return
        yield page
        after = page[-1].id


def output_lines(pages: Iterable[list[OutputJob]]) -> Iterator[bytes]:
    """OpenAI's output lines ``{"id", "custom_id", "response": {"status_code", "request_id",
    "body"}, "error"}``: a succeeded job's body is the upstream's answer spliced in as stored
    (orjson.Fragment: never parsed, so it is byte for byte what Parallel sent, basis included).
    A failed job whose last call got an HTTP error shows that status and an error body; one
    that failed otherwise, or was cancelled, has ``response`` null and an ``error``."""
    for page in pages:
        lines = []
        for job in page:
            line: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
            if job.status == JobStatus.SUCCEEDED and job.raw_body is not None:
                line["response"] = {
                    "status_code": job.status_code or 200,
                    "request_id": job.request_id,
                    "body": orjson.Fragment(job.raw_body),
                }
                line["error"] = None
            elif job.status == JobStatus.CANCELLED and job.error_code != costs.BUDGET_EXCEEDED:
                line.update(response=None, error=CANCELLED_ERROR)
            elif job.status == JobStatus.CANCELLED:  # its budget ran out: say so, as /v1 does
                line.update(response=None, error={"code": job.error_code, "message": job.error})
            elif job.status_code is not None and job.status_code >= 400:
                body = error_json(job.status_code, job.error or "the request failed", None, job.error_code)
                line["response"] = {
                    "status_code": job.status_code,
                    "request_id": job.request_id,
                    "body": body,
                }
                line["error"] = None
            else:
                line.update(response=None, error={"code": job.error_code, "message": job.error})
            lines.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        yield b"".join(lines)


def list_limit(limit: int | None, default: int, most: int) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise OpenAIError(400, f"limit must be between 1 and {most}", param="limit", code="invalid_value")
    return limit


def batch_objects(session: Session, batches: list[Batch], *, spend: bool = True) -> list[dict[str, Any]]:
    """The OpenAI objects of ``batches``: two queries whatever their number, and (``spend``)
    one aggregate each for its usage and cost (a page holds 100 at most)."""
    ids = [b.id for b in batches]
    counts: dict[str, list[tuple[str, int]]] = {batch_id: [] for batch_id in ids}
    for batch_id, status, n in job_rows.status_counts_of_batches(session, ids):
        counts[batch_id].append((status, n))
    finished = rows.last_finished(session, ids) if ids else {}
    return [
        batch_object(
            b,
            all_counts(counts[b.id]),
            finished.get(b.id),
            costs.batch_cost(session, b.id, b.estimated_cost) if spend else None,
        )
        for b in batches
    ]


def generated_file(session: Session, tenant_id: str, file_id: str) -> tuple[Batch, bool] | None:
    """The batch and kind (True: errors) of a generated output or error file id, None for any
    other id; a 404 while the batch has no such file yet. Its usage and cost are not read."""
    generated = output_file_of(file_id)
    if generated is None:
        return None
    batch_id, errors = generated
    batch = get_batch(session, tenant_id, batch_id)
    [shown] = batch_objects(session, [batch], spend=False)
    if shown["error_file_id" if errors else "output_file_id"] != file_id:
        raise not_found("file", file_id)
    return batch, errors


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = rows.openai_batch(session, tenant_id, batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch
