"""The HTTP API's request and response bodies (pydantic), as shown in OpenAPI at /docs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import Header
from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic.config import JsonDict, JsonValue

from pcq.jobs import reuse
from pcq.jobs.errors import InvalidInput
from pcq.models import DeliveryStatus, EventType, JobStatus, Priority
from pcq.views import JobOut, ResultOut
from pcq.wire import ChatCompletionRequest

# Declared as enums in OpenAPI; the stored values stay plain strings.
EventTypeName = Literal["job.succeeded", "job.failed", "job.cancelled", "batch.completed"]
JobEventTypeName = Literal["job.succeeded", "job.failed", "job.cancelled"]
DeliveryStatusName = Literal["pending", "delivered", "failed", "disabled"]
assert set(get_args(EventTypeName)) == set(EventType)
assert set(get_args(DeliveryStatusName)) == set(DeliveryStatus)

MAX_METADATA_BYTES = 16 * 1024
MAX_URL_LENGTH = 2048
NO_NUL = r"^[^\x00]*$"  # a JSON Schema pattern: no NUL character


def storable(value: str) -> str:
    """Refuse what no database column can hold: NUL characters and unpaired surrogates.

    Used for the fields stored as strings (``custom_id``); ``request`` and ``metadata`` are
    stored as the submitted JSON text, where ``\\u0000`` and ``\\ud800`` stay escapes and are
    forwarded faithfully.
    """
    if "\x00" in value:
        raise ValueError("must not contain a NUL (\\u0000) character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain an unpaired surrogate (\\ud800-\\udfff)") from None
    return value


CustomId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        description="Your id for the job; no NUL characters",
        json_schema_extra={"pattern": NO_NUL},  # documents storable's NUL rule
    ),
    AfterValidator(storable),
]


# Printable ASCII (what an HTTP header can carry unambiguously), stored per tenant.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        description="Makes a retry of this POST return the first answer (printable ASCII, at most 255); "
        "the same key with a different body answers 422 (idempotency_key_reused)",
    ),
]


def check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """At most MAX_METADATA_BYTES; NUL characters are kept (stored as the submitted text), but
    an unpaired surrogate is refused, because no JSON answer could give it back."""
    if value is None:
        return None
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except UnicodeEncodeError:
        raise ValueError("must not contain an unpaired surrogate (\\ud800-\\udfff)") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def string_doc(**keywords: JsonValue) -> Callable[[JsonDict], None]:
    """``json_schema_extra`` adding JSON Schema keywords to the string branch of an optional field
    (documentation only: the validators above and below are what check)."""

    def extra(schema: JsonDict) -> None:
        branches = schema.get("anyOf")
        for branch in branches if isinstance(branches, list) else [schema]:
            if isinstance(branch, dict) and branch.get("type") == "string":
                branch.update(keywords)

    return extra


# AnyHttpUrl alone documents any URI. The length is checked once normalized (a bare host gains
# a trailing "/"), as stored.
WEBHOOK_URL_DOC = string_doc(pattern="^[Hh][Tt][Tt][Pp][Ss]?://", maxLength=MAX_URL_LENGTH)
# The SSRF guard (api/webhook_urls.py), which no JSON Schema can say.
WEBHOOK_URL_RULE = (
    "Refused (422) unless it goes to a public address over http(s): no user name or password; port "
    "80, 443 or 1024-65535; a host that is no local name (localhost, *.localhost, *.local, *.internal, "
    "..., a single label), no non-public address (loopback, private, link-local, CGNAT, multicast, "
    "reserved, ..., in any spelling) and, for a name, resolves to public addresses only."
)


def check_webhook_url(value: AnyHttpUrl | None) -> str | None:
    """The URL as stored. Called on a validated body (not as a validator), hence InvalidInput."""
    if value is None:
        return None
    text = str(value)
    if len(text) > MAX_URL_LENGTH:
        raise InvalidInput(f"webhook_url: must be at most {MAX_URL_LENGTH} characters once normalized")
    return text


PRIORITY_RULE = (
    "Within its tenant's share of the upstream quota, high goes first and low takes only what normal leaves"
)
MAX_COST = 1e9
MAX_COST_RULE = (
    "USD the batch may spend: no call starts that could take its spend past it; the jobs left "
    "end cancelled (error_code budget_exceeded) and calls in flight finish."
)

# A batch's priority read on its own: a JSON batch that names it before its requests gives it to
# them as they are read (api.batch_input).
PRIORITY = TypeAdapter(Priority)


REUSE_RULE = (
    "A duration (30s, 15m, 24h, 7d; at most 30d): if the tenant has a succeeded job with the "
    "byte-identical request whose answer was called within it, this job takes a copy of that "
    "answer (result.reused_from names that job) instead of calling, at no cost; identical requests "
    "running at once make one call"
)


def check_reuse(value: str | None) -> str | None:
    """A ``reuse`` duration that pcq.jobs.reuse.parse_window reads (ValueError otherwise)."""
    if value is not None:
        reuse.parse_window(value)
    return value


def reuse_seconds(value: str | None) -> int | None:
    """A validated ``reuse`` duration in seconds (None: no reuse)."""
    return None if value is None else reuse.parse_window(value)


# The pattern documents the shape; the bounds (more than 0, at most 30 days) are checked only.
Reuse = Annotated[
    str | None,
    AfterValidator(check_reuse),
    Field(json_schema_extra=string_doc(pattern=reuse.DURATION_PATTERN)),
]
REUSE = TypeAdapter(Reuse)  # a batch's reuse read on its own, as PRIORITY


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    custom_id: CustomId | None = None
    metadata: dict[str, Any] | None = None
    webhook_url: AnyHttpUrl | None = Field(
        default=None,
        description="http(s) URL told when the job ends (delivery: coming); at most "
        f"{MAX_URL_LENGTH} characters once normalized (a bare host gains a trailing /). {WEBHOOK_URL_RULE}",
        json_schema_extra=WEBHOOK_URL_DOC,
    )
    priority: Priority = Field(default=Priority.NORMAL, description=f"{PRIORITY_RULE}.")
    reuse: Reuse = Field(default=None, description=f"{REUSE_RULE}. Absent: it always calls.")

    _meta = field_validator("metadata")(check_metadata)


class BatchLine(BaseModel):
    """One line of a batch, OpenAI Batch style."""

    model_config = ConfigDict(extra="forbid")

    custom_id: CustomId
    body: ChatCompletionRequest
    method: str | None = Field(default=None, json_schema_extra=string_doc(pattern="^[Pp][Oo][Ss][Tt]$"))
    url: str | None = Field(
        default=None,
        json_schema_extra=string_doc(enum=["/v1beta/chat/completions", "/v1/chat/completions"]),
    )
    metadata: dict[str, Any] | None = None
    priority: Priority | None = Field(
        default=None, description=f"This job's priority; absent or null: the batch's. {PRIORITY_RULE}."
    )
    reuse: Reuse = Field(
        default=None, description=f"This job's reuse window; absent or null: the batch's. {REUSE_RULE}."
    )

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

    # Each item is read as a BatchLine (so a bad one is named by its index); documented as one.
    requests: list[dict[str, Any]] = Field(
        min_length=1,
        json_schema_extra={"items": {"$ref": "#/components/schemas/BatchLine"}},
        description="The batch's requests; custom_id must be unique within it",
    )
    metadata: dict[str, Any] | None = None
    webhook_url: AnyHttpUrl | None = Field(
        default=None,
        description=f"As a job's webhook_url. {WEBHOOK_URL_RULE}",
        json_schema_extra=WEBHOOK_URL_DOC,
    )
    webhook_events: list[JobEventTypeName] | None = Field(
        default=None,
        max_length=3,
        description="Job events also sent to the batch's webhook_url (batch.completed always is); "
        "without a webhook_url they go nowhere",
    )
    priority: Priority = Field(
        default=Priority.NORMAL,
        description="The priority of the batch's jobs, but those of requests that name their own; "
        f"absent: the ?priority= query parameter's, else normal. {PRIORITY_RULE}.",
    )
    max_cost: float | None = Field(
        default=None,
        gt=0,
        le=MAX_COST,
        allow_inf_nan=False,
        description=f"{MAX_COST_RULE} Absent: the ?max_cost= query parameter's, else no limit.",
    )
    reuse: Reuse = Field(
        default=None,
        description="The reuse window of the batch's jobs, but those of requests that name their own; "
        f"absent: the ?reuse= query parameter's, else none. {REUSE_RULE}.",
    )

    _meta = field_validator("metadata")(check_metadata)


class CostEstimate(BaseModel):
    estimated: float = Field(description="USD: one call per job at its model's request price (PCQ_PRICES)")


class DryRunOut(BaseModel):
    """``POST /v1/batches?dry_run=true``: the batch validated as a submission is, nothing stored."""

    dry_run: Literal[True] = True
    total: int
    models: dict[str, int] = Field(description="Jobs per model")
    cost: CostEstimate
    max_cost: float | None


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


class DomainCountOut(BaseModel):
    domain: str | None = Field(description="The URL's host, lower case; null: URLs that name no host")
    citations: int = Field(description="Citations of the batch that name this domain")
    jobs: int = Field(description="Jobs of the batch with at least one of them")


class DomainPage(BaseModel):
    data: list[DomainCountOut] = Field(description="Most cited first; ties by domain")
    next_cursor: str | None


class ErrorOut(BaseModel):
    error: str
    detail: str


class ExportLine(BaseModel):
    """One line of ``GET /v1/batches/{batch_id}/results`` (JSONL)."""

    custom_id: str | None
    job_id: str
    status: JobStatus
    result: ResultOut | None = Field(default=None, description="Only when the job succeeded")
    error: str | None = Field(default=None, description="Only when the job did not succeed")
    error_code: str | None = None


class WebhookSecretOut(BaseModel):
    """The tenant's current webhook signing secret (Standard Webhooks)."""

    secret: str = Field(
        pattern=r"^whsec_[A-Za-z0-9+/]{43}=$",
        description="`whsec_` + base64 of 32 random bytes. Verify deliveries with it (for example "
        "`standardwebhooks.Webhook(secret).verify(body, headers)`): `webhook-signature` holds one "
        "`v1,<base64 HMAC-SHA256>` of `{webhook-id}.{webhook-timestamp}.{body}` per signing secret.",
    )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description='Per dependency: "ok" or "unreachable: <why>"')


class DeliveryAttemptOut(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's status; null when none came back")
    latency_ms: int
    error: str | None = Field(
        description="null for a 2xx; else why: http_<status>, redirect, timeout, connect, dns, "
        "ssrf_refused, ..."
    )


class DeliveryOut(BaseModel):
    id: str = Field(description="The event's webhook-id header, the same on every attempt")
    object: str = "webhook_delivery"
    type: EventTypeName
    url: str
    status: DeliveryStatusName
    job_id: str | None
    batch_id: str | None
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When a pending event is tried next")
    attempts: list[DeliveryAttemptOut]


class DeliveryPage(BaseModel):
    data: list[DeliveryOut]
    next_cursor: str | None
