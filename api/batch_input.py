"""Reading batch bodies: JSONL incrementally (memory bounded by one line), or JSON at once.

Every line is validated before anything is committed; the first bad one answers 422 naming
it, and nothing is stored.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import ValidationError

from api.schemas import BatchCreate, BatchLine, check_webhook_url
from pcq.jobs.errors import InvalidInput, TooLarge
from pcq.jobs.intake import NewJob
from pcq.verbatim import Member, NotJson, decode_utf8, items, members
from pcq.wire import KNOWN_MODELS

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def check_model(model: str, where: str = "request") -> None:
    if model not in KNOWN_MODELS:
        raise InvalidInput(f"{where}.model: unknown model {model!r}; use one of {', '.join(KNOWN_MODELS)}")


def describe(exc: ValidationError, where: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{where}: {loc}: {first['msg']}" if loc else f"{where}: {first['msg']}"


def read_object(text: str, where: str) -> dict[str, Member]:
    """The members of one submitted JSON object, each with its exact text."""
    try:
        return members(text)
    except NotJson as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def read_body(raw: bytes, where: str = "body") -> dict[str, Member]:
    try:
        text = decode_utf8(raw)
    except NotJson as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    return read_object(text, where)


def text_of(found: dict[str, Member], key: str) -> str | None:
    """The submitted text of a member; None when it is absent or null."""
    member = found.get(key)
    return None if member is None or member.value is None else member.text


def line_to_job(text: str, where: str) -> NewJob:
    """One batch line (or JSON batch item): validated, its body and metadata kept verbatim."""
    found = read_object(text, where)
    try:
        line = BatchLine.model_validate({k: m.value for k, m in found.items()})
    except ValidationError as exc:
        raise InvalidInput(describe(exc, where)) from None
    check_model(line.body.model, f"{where}: body")
    return NewJob(
        request_json=found["body"].text,
        model=line.body.model,
        stream=bool(line.body.stream),
        custom_id=line.custom_id,
        metadata_json=text_of(found, "metadata"),
    )


class UniqueIds:
    """custom_id must be unique within a batch; remembers where each was first seen."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def check(self, item: NewJob, label: str) -> None:
        assert item.custom_id is not None
        first = self._seen.setdefault(item.custom_id, label)
        if first != label:
            raise InvalidInput(
                f"{label}: custom_id {item.custom_id!r} already used by {first}; "
                "it must be unique within the batch"
            )


class JsonlReader:
    """Feed it bytes as they arrive; it yields one validated job per complete line."""

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.count = 0
        self._number = 0
        self._partial = b""
        self._ids = UniqueIds()

    def feed(self, chunk: bytes) -> Iterator[NewJob]:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > self.max_line_bytes:
            raise TooLarge(f"line {self._number + len(lines) + 1} is longer than {self.max_line_bytes} bytes")
        for raw in lines:
            job = self._line(raw)
            if job is not None:
                yield job

    def finish(self) -> Iterator[NewJob]:
        job = self._line(self._partial)
        self._partial = b""
        if job is not None:
            yield job
        if self.count == 0:
            raise InvalidInput("the batch has no requests")

    def _line(self, raw: bytes) -> NewJob | None:
        self._number += 1
        label = f"line {self._number}"
        if len(raw) > self.max_line_bytes:
            raise TooLarge(f"{label} is longer than {self.max_line_bytes} bytes")
        if not raw.strip():
            return None
        if self.count >= self.max_lines:
            raise TooLarge(f"a batch holds at most {self.max_lines} lines")
        try:
            text = decode_utf8(raw)
        except NotJson as exc:
            raise InvalidInput(f"{label}: {exc}") from None
        job = line_to_job(text, label)
        self._ids.check(job, label)
        self.count += 1
        return job


def parse_json_batch(raw: bytes, max_lines: int) -> tuple[list[NewJob], str | None, str | None]:
    """``{"requests": [...], "metadata"?, "webhook_url"?}``, read at once (bounded by the body
    limit); returns the jobs, the batch's metadata text and its webhook URL."""
    found = read_body(raw)
    try:
        body = BatchCreate.model_validate({k: m.value for k, m in found.items()})
    except ValidationError as exc:
        raise InvalidInput(describe(exc, "body")) from None
    if len(body.requests) > max_lines:
        raise TooLarge(f"a batch holds at most {max_lines} requests")
    ids = UniqueIds()
    jobs = []
    for i, text in enumerate(items(found["requests"].text)):
        item = line_to_job(text, f"requests[{i}]")
        ids.check(item, f"requests[{i}]")
        jobs.append(item)
    return jobs, text_of(found, "metadata"), check_webhook_url(body.webhook_url)
