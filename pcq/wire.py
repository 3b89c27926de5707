"""The upstream's wire types: what we accept as a request, and how answers are read.

Requests are validated strictly enough to reject what the upstream would refuse with a 422
(so nothing is stored or billed for it) while keeping every field the user sent: the
upstream ignores OpenAI parameters it does not support, and so do we. Responses are read
tolerantly: unknown keys, null ``usage``, ``message`` vs ``delta`` are all legal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    OnErrorOmit,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import core_schema

KNOWN_MODELS = ("speed", "lite", "base", "core")

# What one request may hold. Far above what a chat model's context takes (1,000,000 characters
# are ~250,000 tokens), so no request the upstream would accept is refused, and a request that
# is large to store and to send is refused here, not after it was queued and billed.
MAX_MESSAGES = 1000
MAX_MESSAGE_CHARS = 200_000  # characters of one message's content
MAX_CONTENT_CHARS = 1_000_000  # characters of content of all the messages of one request


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# What a body must hold for anything parsed from it to hold NUL or an unpaired surrogate: a NUL,
# or a \u0000 / \uD800-\uDFFF escape (the body is decoded with errors="replace", so it has no
# surrogate of its own). An escaped backslash before "u" matches too: harmless, it only costs a
# cleaning pass.
_UNSTORABLE_IN_BODY = re.compile(r"\x00|\\u0000|\\u[dD][89abcdefABCDEF]")


def needs_cleaning(raw_body: str) -> bool:
    """Whether the answers parsed from ``raw_body`` may need ``storable``: one scan of the body,
    so the worker's hot path pays nothing more for the usual answer."""
    return _UNSTORABLE_IN_BODY.search(raw_body) is not None


def storable(value: Any) -> Any:
    """``value`` with every NUL and unpaired surrogate replaced by U+FFFD, at any depth.

    What the upstream answers is stored in text and JSON columns, and PostgreSQL holds neither
    character (a JSON escape ``\\u0000`` decodes to one). Such an answer must still be stored,
    not retried for ever, so the parsed copies are cleaned; the raw body keeps its escapes.
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_schema", "json_object"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    """Request body of ``POST /v1beta/chat/completions`` (OpenAI compatible)."""

    model_config = ConfigDict(extra="allow")

    # An enum in OpenAPI; checked against KNOWN_MODELS where a request is accepted, so the
    # answer to an unknown one can name the models (and the wire type stays a plain string).
    model: str = Field(min_length=1, max_length=64, json_schema_extra={"enum": list(KNOWN_MODELS)})
    messages: list[ChatMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description=f"At most {MAX_MESSAGES:,} messages, with at most {MAX_CONTENT_CHARS:,} characters "
        f"of content in all (and {MAX_MESSAGE_CHARS:,} in one)",
    )
    stream: StrictBool | None = None  # not "true" or 1: the request is forwarded as sent
    response_format: ResponseFormat | None = None

    @field_validator("messages")
    @classmethod
    def _total_content(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.content) for m in messages)
        if total > MAX_CONTENT_CHARS:
            raise ValueError(
                f"at most {MAX_CONTENT_CHARS} characters of message content in one request, not {total}"
            )
        return messages


def _absent(_: Any) -> None:
    return None


def _or_none(source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    # The type's own schema first; anything it refuses is read as None, without a Python call
    # on the usual path.
    return core_schema.union_schema(
        [handler(source), core_schema.no_info_after_validator_function(_absent, core_schema.any_schema())],
        mode="left_to_right",
    )


# A value the upstream may leave out, send as null or fill with something else: all read as
# None, never an error (the documentation says several fields can come back empty).
OrNone = GetPydanticSchema(_or_none)
Text = Annotated[StrictStr | None, OrNone]
Usage = Annotated[dict[str, Any] | None, OrNone]


def _falsy_as_empty(value: Any) -> Any:
    return value or []


def _falsy_as_none(value: Any) -> Any:
    return value or None


def _list_or_empty(value: Any) -> Any:
    return value if isinstance(value, list) else []


@dataclass
class CitationData:
    url: StrictStr
    title: Text = None
    # Only the strings of a list of excerpts are kept.
    excerpts: Annotated[list[OnErrorOmit[StrictStr]] | None, OrNone] = None

    @property
    def domain(self) -> str | None:
        return url_domain(self.url)


def url_domain(url: str) -> str | None:
    """A citation's ``domain``: its URL's host, lower-cased (None if it has none)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower() if host else None


@dataclass
class BasisData:
    field: StrictStr
    reasoning: Text = None
    confidence: Text = None
    # Absent, null or empty: no citations.
    citations: Annotated[list[CitationData], BeforeValidator(_falsy_as_empty)] = dataclass_field(
        default_factory=list
    )


@dataclass
class ParsedCompletion:
    """What one successful upstream answer is stored as."""

    raw_body: str
    content: str | None
    parsed: Any | None
    model: str | None
    finish_reason: str | None
    upstream_id: str | None
    usage: dict[str, Any] | None
    basis: list[BasisData] = dataclass_field(default_factory=list)


class MalformedResponse(ValueError):
    """The upstream answered 200 with something that is not a chat completion."""


class _Part(BaseModel):
    """A choice's ``message`` or ``delta``."""

    content: Text = None


class _Choice(BaseModel):
    # The schema requires ``delta`` even on non-streamed answers; OpenAI clients read
    # ``message``. Either may come, or both.
    message: Annotated[_Part | None, OrNone] = None
    delta: Annotated[_Part | None, OrNone] = None
    finish_reason: Text = None

    @property
    def text(self) -> str | None:
        for part in (self.message, self.delta):
            if part is not None and part.content is not None:
                return part.content
        return None


def _first(value: Any) -> Any:
    return value[:1] if isinstance(value, list) else value


class _Completion(BaseModel):
    """A ``chat.completion`` body; unknown keys are ignored (pydantic's default)."""

    id: Text = None
    model: Text = None
    # ``choices`` has one item; only the first is read, and it must be an object.
    choices: Annotated[list[_Choice], BeforeValidator(_first), Field(min_length=1)]
    usage: Usage = None
    basis: list[BasisData] | None = None


class _Chunk(BaseModel):
    """A ``chat.completion.chunk``: choices that are not objects are skipped."""

    id: Text = None
    model: Text = None
    choices: Annotated[list[OnErrorOmit[_Choice]], BeforeValidator(_list_or_empty)] = []
    usage: Usage = None
    # Any chunk may carry basis; an empty one says nothing.
    basis: Annotated[list[BasisData] | None, BeforeValidator(_falsy_as_none)] = None


def _malformed(exc: ValidationError, not_an_object: str) -> MalformedResponse:
    """The first problem of ``exc``, said the way a reader of the attempt understands it."""
    loc = exc.errors(include_url=False, include_context=False, include_input=False)[0]["loc"]
    if not loc:
        return MalformedResponse(not_an_object)
    if loc[0] == "choices":
        return MalformedResponse("no choices in the answer")
    if len(loc) == 1:
        return MalformedResponse("basis is not a list")
    if len(loc) == 2 or loc[2] == "field":
        return MalformedResponse("basis entry without a field name")
    return MalformedResponse("citation without a url")


def parse_json_content(content: str | None, response_format: dict[str, Any] | None) -> Any | None:
    """The parsed answer for json_schema/json_object requests; None when not JSON."""
    if content is None or not response_format:
        return None
    if response_format.get("type") not in ("json_schema", "json_object"):
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _loads(text: str, problem: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise MalformedResponse(problem) from exc


def parse_completion(raw: str, response_format: dict[str, Any] | None) -> ParsedCompletion:
    """Read a non-streamed ``chat.completion`` body."""
    try:
        answer = _Completion.model_validate(_loads(raw, "body is not JSON"))
    except ValidationError as exc:
        raise _malformed(exc, "body is not a JSON object") from exc
    choice = answer.choices[0]
    content = choice.text
    return ParsedCompletion(
        raw_body=raw,
        content=content,
        parsed=parse_json_content(content, response_format),
        model=answer.model or None,
        finish_reason=choice.finish_reason,
        upstream_id=answer.id or None,
        usage=answer.usage,
        basis=answer.basis or [],
    )


class StreamAssembler:
    """Builds one completion from ``chat.completion.chunk`` events, refusing truncated streams."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.saw_content = False
        self.done = False
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.upstream_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.basis: list[BasisData] = []
        self._basis_seen: set[str] = set()

    def feed_data(self, data: str) -> None:
        """One SSE ``data:`` payload."""
        if data.strip() == "[DONE]":
            self.done = True
            return
        raw = _loads(data, "stream chunk is not JSON")
        try:
            chunk = _Chunk.model_validate(raw)
        except ValidationError as exc:
            raise _malformed(exc, "stream chunk is not an object") from exc
        self.model = self.model or chunk.model or None
        self.upstream_id = self.upstream_id or chunk.id or None
        if raw.get("usage") is not None:  # replaces an earlier usage, even when it cannot be read
            self.usage = chunk.usage
        # A later chunk may repeat an earlier basis entry: keep each distinct entry once.
        if chunk.basis:
            for entry, raw_entry in zip(chunk.basis, raw["basis"], strict=True):
                fingerprint = json.dumps(raw_entry, sort_keys=True)
                if fingerprint not in self._basis_seen:
                    self._basis_seen.add(fingerprint)
                    self.basis.append(entry)
        for choice in chunk.choices:
            text = choice.text
            if text is not None:
                self.parts.append(text)
                self.saw_content = True
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    @property
    def complete(self) -> bool:
        return self.done or self.finish_reason is not None

    def result(self, raw: str, response_format: dict[str, Any] | None) -> ParsedCompletion:
        content = "".join(self.parts) if self.saw_content else None
        return ParsedCompletion(
            raw_body=raw,
            content=content,
            parsed=parse_json_content(content, response_format),
            model=self.model,
            finish_reason=self.finish_reason,
            upstream_id=self.upstream_id,
            usage=self.usage,
            basis=self.basis,
        )


def iter_sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of a complete SSE text, events joined per the SSE rules."""
    events: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if not line:
            if current:
                events.append("\n".join(current))
                current = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            current.append(value[1:] if value.startswith(" ") else value)
    if current:
        events.append("\n".join(current))
    return events


@dataclass
class Outcome:
    """What one upstream call ended as; the job's life cycle settles on it."""

    kind: str  # ok | retryable | fatal
    started_at: datetime
    finished_at: datetime
    completion: ParsedCompletion | None = None
    status_code: int | None = None
    # http_4xx, rate_limited, server_error, timeout, transport, truncated, malformed, too_large
    error_class: str | None = None
    summary: str | None = None  # safe, short, shown to users
    raw_error: str | None = None  # the upstream's error body, redacted, bounded
    retry_after: float | None = None
    upstream_request_id: str | None = None
