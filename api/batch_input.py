"""Reading batch bodies as streams: JSONL line by line, JSON request by request (memory bounded
by one request either way, however large the batch).

Every line is validated before anything is committed; the first bad one answers 422 naming
it, and nothing is stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import IO

from pydantic import ValidationError

from api.intake import NewJob
from api.schemas import PRIORITY, REUSE, BatchCreate, BatchLine, check_webhook_url, reuse_seconds
from api.verbatim import Member, NotJson, decode_utf8, members
from pcq.jobs.errors import InvalidInput, TooLarge
from pcq.models import Priority
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


def decode(raw: bytes, where: str) -> str:
    """Submitted bytes as text; 422 naming ``where`` if they are not UTF-8."""
    try:
        return decode_utf8(raw)
    except NotJson as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def read_body(raw: bytes, where: str = "body") -> dict[str, Member]:
    return read_object(decode(raw, where), where)


def text_of(found: dict[str, Member], key: str) -> str | None:
    """The submitted text of a member; None when it is absent or null."""
    member = found.get(key)
    return None if member is None or member.value is None else member.text


def line_to_job(text: str, where: str) -> NewJob:
    """One batch line (or JSON batch item): validated, its body and metadata kept verbatim."""
    return members_to_job(read_object(text, where), where)


def members_to_job(found: dict[str, Member], where: str) -> NewJob:
    """A batch line already read into its members (api.verbatim): validated as a BatchLine;
    the job's request and metadata are their members' exact text."""
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
        priority=line.priority,
        reuse_seconds=reuse_seconds(line.reuse),
    )


def _priority(text: str, where: str) -> Priority:
    """A batch's ``priority`` member from its text; 422 naming ``where`` unless it is one."""
    value = read_object('{"priority":' + text + "}", where)["priority"].value
    try:
        return PRIORITY.validate_python(value)
    except ValidationError as exc:
        raise InvalidInput(describe(exc, where)) from None


def _reuse(text: str, where: str) -> int | None:
    """A batch's ``reuse`` member from its text, in seconds; 422 naming ``where`` unless it is a
    duration (or null)."""
    value = read_object('{"reuse":' + text + "}", where)["reuse"].value
    try:
        return reuse_seconds(REUSE.validate_python(value))
    except ValidationError as exc:
        raise InvalidInput(describe(exc, where)) from None


class UniqueIds:
    """custom_id must be unique within a batch; remembers where each was first seen (by number,
    not by label: a batch of 100,000 requests keeps 100,000 of them)."""

    def __init__(self, label: Callable[[int], str]) -> None:
        self._label = label
        self._seen: dict[str, int] = {}

    def check(self, item: NewJob, number: int) -> None:
        assert item.custom_id is not None
        first = self._seen.setdefault(item.custom_id, number)
        if first != number:
            raise InvalidInput(
                f"{self._label(number)}: custom_id {item.custom_id!r} already used by {self._label(first)}; "
                "it must be unique within the batch"
            )


class JsonlReader:
    """Feed it bytes as they arrive; it yields one validated job per complete line.

    Every line counts toward ``max_lines``, blank ones too: a body of nothing but newlines costs
    as much to read as one of requests, and is refused as soon as it has more lines than that.
    """

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.count = 0
        self._number = 0
        self._partial = b""
        self._ids = UniqueIds("line {}".format)

    def feed(self, chunk: bytes) -> Iterator[NewJob]:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > self.max_line_bytes:
            number = self._number + len(lines) + 1
            raise TooLarge(
                f"line {number} is longer than {self.max_line_bytes} bytes (PCQ_MAX_REQUEST_BYTES)"
            )
        for raw in lines:
            job = self._line(raw)
            if job is not None:
                yield job

    def finish(self) -> Iterator[NewJob]:
        if self._partial:  # the last line has no newline (after a final newline, nothing is left)
            job = self._line(self._partial)
            self._partial = b""
            if job is not None:
                yield job
        if self.count == 0:
            raise InvalidInput("the batch has no requests")

    def _line(self, raw: bytes) -> NewJob | None:
        self._number += 1
        label = f"line {self._number}"
        if self._number > self.max_lines:
            raise TooLarge(
                f"a batch holds at most {self.max_lines} lines (PCQ_MAX_BATCH_LINES; blank lines count)"
            )
        if len(raw) > self.max_line_bytes:
            raise TooLarge(f"{label} is longer than {self.max_line_bytes} bytes (PCQ_MAX_REQUEST_BYTES)")
        if not raw.strip():
            return None
        job = line_to_job(decode(raw, label), label)
        self._ids.check(job, self._number)
        self.count += 1
        return job


READ_SIZE = 1024 * 1024  # bytes read from a spooled body at a time


class JsonlBatch:
    """A JSONL body read from a file, ``READ_SIZE`` bytes at a time (memory: about one line);
    an api.intake.BatchSource, like JsonBatch. Its priority is the ``?priority=`` it came with
    (a JSONL body has no place for one)."""

    metadata_json: str | None = None
    webhook_url: str | None = None
    webhook_events: str | None = None

    def __init__(
        self,
        file: IO[bytes],
        max_lines: int,
        max_line_bytes: int,
        priority: Priority | None = None,
        max_cost: float | None = None,
        reuse_seconds: int | None = None,
    ) -> None:
        self.priority = priority
        self.max_cost = max_cost  # the ?max_cost= it came with (a JSONL body has no place for one)
        self.reuse_seconds = reuse_seconds  # ?reuse=, likewise
        self._file = file
        self._reader = JsonlReader(max_lines, max_line_bytes)

    def jobs(self) -> Iterator[NewJob]:
        while chunk := self._file.read(READ_SIZE):
            yield from self._reader.feed(chunk)
        yield from self._reader.finish()


# Scanning a JSON text for the end of one value, without parsing it: whitespace; one token of
# its structure, a bracket or a whole string (group 1 empty when the string runs past what has
# been read so far); the end of a number or constant.
_BLANK = re.compile(rb"[ \t\n\r]*")
_TOKEN = re.compile(rb'[\[\]{}]|"(?:[^"\\]++|\\.)*+("?)', re.S)
_SCALAR_END = re.compile(rb"[,\]}\[{\" \t\n\r]")
_JSON_BATCH_KEYS = (
    "requests",
    "metadata",
    "webhook_url",
    "webhook_events",
    "priority",
    "max_cost",
    "reuse",
)


class JsonBatch:
    """A JSON batch ``{"requests": [...], "metadata"?, "webhook_url"?, "webhook_events"?,
    "priority"?}`` read from a file as a stream: one request at a time, so memory is bounded by
    one request however large the batch.

    The scan finds where each request ends (brackets outside strings) and hands its exact
    bytes to ``line_to_job``, which parses and validates it as it does a JSONL line: what is
    stored is the text submitted. A request longer than ``max_item_bytes`` answers 413 naming
    it; a repeated ``requests`` key, or any other key, 422.

    ``priority`` starts as the ``?priority=`` the batch came with, and is the body's own as soon
    as that is read: before the requests, they take it as they are read; after them,
    api.intake gives it to those already stored.
    """

    def __init__(
        self,
        file: IO[bytes],
        max_lines: int,
        max_item_bytes: int,
        priority: Priority | None = None,
        max_cost: float | None = None,
        reuse_seconds: int | None = None,
    ) -> None:
        self.max_lines = max_lines
        self.max_cost = max_cost  # the ?max_cost= it came with, until the body names its own
        self.max_item_bytes = max_item_bytes
        self.count = 0
        self.metadata_json: str | None = None
        self.webhook_url: str | None = None
        self.webhook_events: str | None = None  # JSON text of the job event types asked for
        self.priority = priority
        self.reuse_seconds = reuse_seconds  # ?reuse=, then the body's "reuse", as for priority
        self._file = file
        self._buf = b""
        self._pos = 0  # the next byte of _buf to read
        self._dropped = 0  # bytes of the body before _buf (for error positions)
        self._eof = False

    def jobs(self) -> Iterator[NewJob]:
        if self._peek() != ord("{"):
            raise InvalidInput("body: not a JSON object")
        self._pos += 1
        others: dict[str, str] = {}  # the exact text of each member but a streamed "requests"
        streamed = False
        if self._peek() == ord("}"):
            self._pos += 1
        else:
            while True:
                key = self._key()
                if key not in _JSON_BATCH_KEYS:
                    shown = key[:100].encode("utf-8", "backslashreplace").decode()  # a lone surrogate
                    raise InvalidInput(f"body: {shown}: Extra inputs are not permitted")
                if key == "requests" and (streamed or "requests" in others):
                    raise InvalidInput("body: requests: given more than once")
                if key == "requests" and self._peek() == ord("["):
                    streamed = True
                    yield from self._requests()
                else:
                    where = f"body: {key}"
                    others.pop(key, None)  # a repeated key keeps its last value, as json.loads does
                    others[key] = decode(self._value(where, self.max_item_bytes), where)
                    if key == "priority":  # known now, so the requests read next take it
                        self.priority = _priority(others[key], where)
                    if key == "reuse":
                        self.reuse_seconds = _reuse(others[key], where)
                sep = self._peek()
                self._pos += 1
                if sep == ord("}"):
                    break
                if sep != ord(","):
                    raise InvalidInput(
                        f"body: not valid JSON (expected ',' or '}}' at byte {self._at() - 1})"
                    )
        if self._peek() is not None:
            raise InvalidInput(f"body: not valid JSON (extra data at byte {self._at()})")
        # The other members, read as one object (so as a whole body would be: depth, constants).
        found = read_object("{" + ",".join(f'"{k}":{text}' for k, text in others.items()) + "}", "body")
        values = {k: m.value for k, m in found.items()}
        if streamed:
            values["requests"] = [{}] if self.count else []  # its items were checked one by one
        try:
            body = BatchCreate.model_validate(values)
        except ValidationError as exc:
            raise InvalidInput(describe(exc, "body")) from None
        self.metadata_json = text_of(found, "metadata")
        self.webhook_url = check_webhook_url(body.webhook_url)
        if body.max_cost is not None:
            self.max_cost = body.max_cost
        if body.webhook_events:  # kept even without a webhook_url: they go to it, if one is set
            self.webhook_events = json.dumps(sorted(set(body.webhook_events)))

    def _requests(self) -> Iterator[NewJob]:
        self._pos += 1  # the "["
        ids = UniqueIds("requests[{}]".format)
        if self._peek() == ord("]"):
            self._pos += 1
            return
        while True:
            label = f"requests[{self.count}]"
            if self.count >= self.max_lines:
                raise TooLarge(f"a batch holds at most {self.max_lines} requests (PCQ_MAX_BATCH_LINES)")
            job = line_to_job(decode(self._value(label, self.max_item_bytes), label), label)
            ids.check(job, self.count)
            self.count += 1
            yield job
            sep = self._peek()
            self._pos += 1
            if sep == ord("]"):
                return
            if sep != ord(","):
                raise InvalidInput(
                    f"body: requests: not valid JSON (expected ',' or ']' at byte {self._at() - 1})"
                )

    def _key(self) -> str:
        if self._peek() != ord('"'):
            raise InvalidInput(f"body: not valid JSON (expected a key at byte {self._at()})")
        raw = self._value("body: a key", self.max_item_bytes)
        try:
            key = json.loads(decode(raw, "body: a key"))
        except ValueError:
            raise InvalidInput(f"body: not valid JSON (a bad key at byte {self._at() - len(raw)})") from None
        if self._peek() != ord(":"):
            raise InvalidInput(f"body: not valid JSON (expected ':' at byte {self._at()})")
        self._pos += 1
        assert isinstance(key, str)
        return key

    def _value(self, where: str, limit: int) -> bytes:
        """The exact bytes of the JSON value at the next non-blank byte, consumed. Only its
        extent is found here (brackets outside strings); the parser judges it."""
        first = self._peek()
        if first is None:
            raise InvalidInput(f"{where}: not valid JSON (the body ends where a value should be)")
        if first in b"]},:":
            raise InvalidInput(f"{where}: not valid JSON (expected a value at byte {self._at()})")
        depth = 0
        scanned = 0  # bytes of the value scanned so far, from self._pos
        end = None
        while end is None:
            if first in b'[{"':
                while True:
                    match = _TOKEN.search(self._buf, self._pos + scanned)
                    if match is None:
                        scanned = len(self._buf) - self._pos
                        break
                    if match.group()[:1] == b'"':
                        if not match.group(1):  # the string goes on past what was read
                            scanned = match.start() - self._pos
                            break
                    elif match.group() in (b"[", b"{"):
                        depth += 1
                    else:
                        depth -= 1
                    scanned = match.end() - self._pos
                    if depth <= 0:
                        end = scanned
                        break
            else:
                match = _SCALAR_END.search(self._buf, self._pos + 1)
                if match is not None:
                    end = match.start() - self._pos
                elif self._eof:
                    end = len(self._buf) - self._pos
                else:
                    scanned = len(self._buf) - self._pos
            if end is not None:
                break
            if scanned > limit:
                raise TooLarge(f"{where} is longer than {limit} bytes (PCQ_MAX_REQUEST_BYTES)")
            if not self._fill():
                raise InvalidInput(f"{where}: not valid JSON (the body ends inside it)")
        if end > limit:
            raise TooLarge(f"{where} is longer than {limit} bytes (PCQ_MAX_REQUEST_BYTES)")
        value = self._buf[self._pos : self._pos + end]
        self._pos += end
        return value

    def _peek(self) -> int | None:
        """Skip blanks; the next byte, or None at the end of the body."""
        while True:
            match = _BLANK.match(self._buf, self._pos)
            assert match is not None  # the pattern matches the empty string
            self._pos = match.end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return None

    def _fill(self) -> bool:
        """Read more of the body, dropping what was consumed; False at its end."""
        if self._eof:
            return False
        chunk = self._file.read(READ_SIZE)
        if not chunk:
            self._eof = True
            return False
        self._dropped += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def _at(self) -> int:
        return self._dropped + self._pos
