"""The HTTP API's request and response bodies (pydantic), as shown in OpenAPI at /docs."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from pcq.wire import ChatCompletionRequest

MAX_METADATA_BYTES = 16 * 1024
MAX_URL_LENGTH = 2048


def check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def check_webhook_url(value: AnyHttpUrl | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if len(text) > MAX_URL_LENGTH:
        raise ValueError(f"webhook_url must be at most {MAX_URL_LENGTH} characters")
    return text


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    custom_id: str | None = Field(default=None, min_length=1, max_length=255)
    metadata: dict[str, Any] | None = None
    webhook_url: AnyHttpUrl | None = Field(
        default=None, description="http(s) URL told when the job ends (delivery: coming)."
    )

    _meta = field_validator("metadata")(check_metadata)


class BatchLine(BaseModel):
    """One line of a batch, OpenAI Batch style."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=255)
    body: ChatCompletionRequest
    method: str | None = None
    url: str | None = None
    metadata: dict[str, Any] | None = None

    _meta = field_validator("metadata")(check_metadata)

    @field_validator("method")
    @classmethod
    def _post_only(cls, value: str | None) -> str | None:
        if value is not None and value.upper() != "POST":
            raise ValueError("method must be POST")
        return value

    @field_validator("url")
    @classmethod
    def _chat_url(cls, value: str | None) -> str | None:
        if value is not None and value not in ("/v1beta/chat/completions", "/v1/chat/completions"):
            raise ValueError("url must be /v1beta/chat/completions")
        return value


class BatchCreate(BaseModel):
    """JSON body of ``POST /v1/batches`` (JSONL is accepted too, one BatchLine per line)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(min_length=1)
    metadata: dict[str, Any] | None = None
    webhook_url: AnyHttpUrl | None = None

    _meta = field_validator("metadata")(check_metadata)


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class CitationOut(BaseModel):
    url: str
    title: str | None
    excerpts: list[str] | None


class BasisOut(BaseModel):
    field: str
    reasoning: str | None
    confidence: str | None
    citations: list[CitationOut]


class ResultOut(BaseModel):
    content: str | None
    parsed: Any | None
    model: str | None
    finish_reason: str | None
    usage: Usage | None
    basis: list[BasisOut]


class JobOut(BaseModel):
    id: str
    object: str = "job"
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    custom_id: str | None
    batch_id: str | None
    metadata: dict[str, Any] | None
    model: str
    attempts: int
    webhook_url: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    error: str | None = Field(description="A safe summary of why the job failed (or last retry)")
    error_code: str | None
    result: ResultOut | None = None


class BatchOut(BaseModel):
    id: str
    object: str = "batch"
    status: str = Field(description="queued | running | completed")
    total: int
    counts: dict[str, int]
    done: bool
    metadata: dict[str, Any] | None
    webhook_url: str | None
    created_at: datetime
    retried: int | None = Field(default=None, description="Jobs requeued by retry-failed")


class CitationRow(BaseModel):
    id: int
    job_id: str
    custom_id: str | None
    batch_id: str | None
    field: str
    position: int
    url: str
    domain: str | None
    title: str | None
    excerpts: list[str] | None
    reasoning: str | None
    confidence: str | None


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


class CitationPage(BaseModel):
    data: list[CitationRow]
    next_cursor: str | None


class ErrorOut(BaseModel):
    error: str
    detail: str
