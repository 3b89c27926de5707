"""The upstream's wire types: what we accept as a request, and how answers are read.

Requests are validated strictly enough to reject what the upstream would refuse with a 422
(so nothing is stored or billed for it) while keeping every field the user sent: the
upstream ignores OpenAI parameters it does not support, and so do we. Responses are read
tolerantly: unknown keys, null ``usage``, ``message`` vs ``delta`` are all legal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

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


@dataclass
class CitationData:
    url: str
    title: str | None
    excerpts: list[str] | None

    @property
    def domain(self) -> str | None:
        try:
            host = urlsplit(self.url).hostname
        except ValueError:
            return None
        return host.lower() if host else None


@dataclass
class BasisData:
    field: str
    reasoning: str | None
    confidence: str | None
    citations: list[CitationData]


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
    basis: list[BasisData] = field(default_factory=list)


class MalformedResponse(ValueError):
    """The upstream answered 200 with something that is not a chat completion."""


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_basis(items: Any) -> list[BasisData]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise MalformedResponse("basis is not a list")
    out: list[BasisData] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("field"), str):
            raise MalformedResponse("basis entry without a field name")
        cites: list[CitationData] = []
        for c in item.get("citations") or []:
            if not isinstance(c, dict) or not isinstance(c.get("url"), str):
                raise MalformedResponse("citation without a url")
            excerpts = c.get("excerpts")
            if excerpts is not None:
                excerpts = [e for e in excerpts if isinstance(e, str)] if isinstance(excerpts, list) else None
            cites.append(CitationData(url=c["url"], title=_str_or_none(c.get("title")), excerpts=excerpts))
        out.append(
            BasisData(
                field=item["field"],
                reasoning=_str_or_none(item.get("reasoning")),
                confidence=_str_or_none(item.get("confidence")),
                citations=cites,
            )
        )
    return out


def _usage(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _choice_text(choice: dict[str, Any]) -> str | None:
    for key in ("message", "delta"):
        part = choice.get(key)
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            return str(part["content"])
    return None


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


def parse_completion(raw: str, response_format: dict[str, Any] | None) -> ParsedCompletion:
    """Read a non-streamed ``chat.completion`` body."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise MalformedResponse("body is not JSON") from exc
    if not isinstance(body, dict):
        raise MalformedResponse("body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("no choices in the answer")
    choice = choices[0]
    content = _choice_text(choice)
    return ParsedCompletion(
        raw_body=raw,
        content=content,
        parsed=parse_json_content(content, response_format),
        model=_str_or_none(body.get("model")) or None,
        finish_reason=_str_or_none(choice.get("finish_reason")),
        upstream_id=_str_or_none(body.get("id")) or None,
        usage=_usage(body.get("usage")),
        basis=parse_basis(body.get("basis")),
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
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise MalformedResponse("stream chunk is not JSON") from exc
        if not isinstance(chunk, dict):
            raise MalformedResponse("stream chunk is not an object")
        self.model = self.model or _str_or_none(chunk.get("model")) or None
        self.upstream_id = self.upstream_id or _str_or_none(chunk.get("id")) or None
        if chunk.get("usage") is not None:
            self.usage = _usage(chunk.get("usage"))
        # Any chunk may carry basis; a later chunk may repeat an earlier entry, so keep
        # each distinct entry once.
        raw_basis = chunk.get("basis")
        if raw_basis:
            for entry, raw_entry in zip(parse_basis(raw_basis), raw_basis, strict=True):
                fingerprint = json.dumps(raw_entry, sort_keys=True)
                if fingerprint not in self._basis_seen:
                    self._basis_seen.add(fingerprint)
                    self.basis.append(entry)
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            text = _choice_text(choice)
            if text is not None:
                self.parts.append(text)
                self.saw_content = True
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]

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
