"""Process configuration: one pydantic-settings class, read once at process start.

Nothing else in the project reads ``os.environ``, and this module reads it through
pydantic-settings' own environment source. Unknown ``PCQ_*`` variables are an error (a typo
such as ``PCQ_RATE_LIMT_PER_MINUTE`` must not be silently ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

DEFAULT_SQLITE_FILE = "pcq.sqlite3"


class SettingsError(ValueError):
    """The environment holds a setting that cannot be used."""


def normalize_database_url(url: str) -> str:
    """Accept the plain forms people paste and pick the installed driver.

    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://`` (psycopg 3 is a
    declared dependency); an explicit ``+driver`` is kept. ``sqlite:///path`` is left alone.
    """
    url = url.strip()
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    if url.startswith(("postgresql+", "sqlite:", "sqlite+")):
        return url
    raise SettingsError(
        f"DATABASE_URL must start with postgresql:// or sqlite:/// (got {url.split(':', 1)[0]!r})"
    )


class UpstreamKey(BaseModel):
    """One entry of ``PCQ_UPSTREAM_KEYS``; a limit left out takes the global setting."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=1)
    rate_limit_per_minute: int | None = Field(default=None, ge=1)
    rate_limit_burst: int | None = Field(default=None, ge=0)
    max_in_flight: int | None = Field(default=None, ge=0)


@dataclass(frozen=True)
class KeyPolicy:
    """One upstream API key as the workers use it: its limits resolved, its id loggable."""

    key: str
    id: str  # sha256 of the key, first 16 hex chars: safe to log and to name Redis keys
    rate_limit_per_minute: int
    rate_limit_burst: int
    max_in_flight: int  # calls in flight on this key across all workers; 0 = no cap

    def __repr__(self) -> str:  # never the key itself
        return (
            f"KeyPolicy(id={self.id!r}, rate_limit_per_minute={self.rate_limit_per_minute}, "
            f"rate_limit_burst={self.rate_limit_burst}, max_in_flight={self.max_in_flight})"
        )


# Parallel's published prices per 1,000 requests of each model (../shared/spec/upstream-facts.md,
# taken 2026-11-30). No per-token price is published: those are 0 until one is.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "speed": {"per_1k_requests": 5.0},
    "lite": {"per_1k_requests": 5.0},
    "base": {"per_1k_requests": 10.0},
    "core": {"per_1k_requests": 25.0},
}
PRICED_MODELS = tuple(DEFAULT_PRICES)  # pcq.wire.KNOWN_MODELS (pcq.costs checks they agree)
MAX_PRICE = 1e6  # USD per unit: beyond this a price is a typo, not a tariff


class ModelPrice(BaseModel):
    """One model's entry of ``PCQ_PRICES``, in USD: per 1,000 billed requests, and per million
    prompt and completion tokens where the upstream bills tokens (Parallel does not: 0)."""

    model_config = ConfigDict(extra="forbid")

    per_1k_requests: float = Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)
    per_1m_prompt_tokens: float = Field(default=0.0, ge=0, le=MAX_PRICE, allow_inf_nan=False)
    per_1m_completion_tokens: float = Field(default=0.0, ge=0, le=MAX_PRICE, allow_inf_nan=False)


def default_prices() -> dict[str, ModelPrice]:
    return {m: ModelPrice.model_validate(p) for m, p in DEFAULT_PRICES.items()}


def key_id(api_key: str) -> str:
    """Stable short id for an upstream API key (sha256 hex, first 16 chars); never the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


class Settings(BaseSettings):
    """Every setting of every pcq process. See the README's configuration table."""

    # Each setting is read from PCQ_<NAME> (its validation alias, so that errors and the README
    # name the variable), except the four that name their own. Not env_prefix: pydantic-settings
    # applies that only to fields without an alias. Not populate_by_name: it would also read the
    # bare field names (LOG_LEVEL, API_KEY) from the environment.
    model_config = SettingsConfigDict(
        alias_generator=AliasGenerator(validation_alias=lambda name: f"PCQ_{name.upper()}"),
        case_sensitive=False,
        extra="forbid",
    )

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_SQLITE_FILE}",
        validation_alias="DATABASE_URL",
        description="SQLAlchemy URL; plain postgresql:// and sqlite:/// forms are accepted.",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias="REDIS_URL",
        description="Redis for the Celery broker and the shared rate limiter. "
        "Unset: embedded broker (SQLite file) and an in-process limiter.",
    )
    parallel_api_key: SecretStr | None = Field(default=None, validation_alias="PARALLEL_API_KEY")
    parallel_base_url: str = Field(default="https://api.parallel.ai", validation_alias="PARALLEL_BASE_URL")
    # NoDecode: the plain `key1,key2` form is not JSON; _parse_keys reads both forms.
    upstream_keys: Annotated[list[UpstreamKey], NoDecode] = Field(
        default_factory=list,
        description="More upstream keys, each with its own quota: `key1,key2` or a JSON list "
        'like `[{"key":"...","rate_limit_per_minute":1200,"max_in_flight":500}]`.',
    )

    rate_limit_per_minute: int = Field(default=300, ge=1)
    rate_limit_burst: int = Field(default=5, ge=0)
    max_attempts: int = Field(default=5, ge=1, le=50)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=60.0, gt=0)

    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    read_timeout_seconds: float = Field(
        default=360.0,
        gt=0,
        description="Longest silence allowed between bytes of an upstream answer.",
    )
    total_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        description="Deadline for one upstream call; `core` can take 5 minutes.",
    )
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    lease_seconds: float = Field(default=120.0, gt=0)
    sweep_interval_seconds: float = Field(default=2.0, gt=0)
    requeue_after_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A queued job whose message was sent this long ago is sent again "
        "(once the broker's queue is empty).",
    )
    max_in_flight: int = Field(
        default=2000,
        ge=1,
        description="Jobs one worker process holds at once (calls and their short token waits).",
    )
    max_in_flight_per_key: int = Field(
        default=0,
        ge=0,
        description="Calls in flight on one upstream key across all workers; 0 = no cap.",
    )
    admission_horizon_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A worker claims only jobs the shared limiter can start within this long; "
        "the rest wait in the queue, not in a worker.",
    )
    worker_concurrency: int = Field(default=8, ge=1)
    visibility_timeout_seconds: int = Field(default=3600, ge=60)
    queue_name: str = "pcq"
    broker_url: str | None = Field(
        default=None,
        description="Override the Celery broker (default: REDIS_URL, else an SQLite file).",
    )

    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_batch_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_batch_lines: int = Field(default=100_000, ge=1)
    # Uploads (batch bodies) cannot hold the API's resources: see api/uploads.py.
    upload_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A request body must arrive whole within this long of the first read; "
        "otherwise 408 and the connection is closed.",
    )
    max_uploads_per_tenant: int = Field(
        default=4,
        ge=1,
        description="Batch uploads one tenant may have in progress at once, per API process; 429 beyond.",
    )
    max_uploads: int = Field(
        default=32,
        ge=1,
        description="Batch uploads in progress at once, all tenants, per API process; 429 beyond.",
    )
    key_pepper: SecretStr = Field(
        default=SecretStr(""),
        description="Optional secret mixed into API-key hashes.",
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Where `pcq submit` and `pcq export` find the API.",
    )
    api_key: SecretStr | None = Field(default=None, description="Key for `pcq submit`/`export`.")
    log_level: str = "INFO"
    # Each worker's Prometheus metrics (worker/metrics.py); the API serves its own at /metrics.
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of this worker's metrics server; 0 = off (several workers on one host "
        "each need their own).",
    )
    metrics_host: str = Field(
        default="0.0.0.0",  # noqa: S104  (Prometheus scrapes it from another host: README, Metrics)
        description="Address the worker's metrics server binds; it has no authentication, so "
        "keep the port on an internal network.",
    )
    metrics_totals_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often each API process counts the ended jobs and webhook events for "
        "/metrics (a read as long as the history); the queued and running ones are read every 5 s.",
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="`json` (one object per line) or `text`; unset: text when stderr is a "
        "terminal, else JSON (pcq/logs.py).",
    )

    # Per-tenant limits of the API (api/tenant_limits.py); 0 = off.
    api_rate_limit_per_minute: int = Field(
        default=0,
        ge=0,
        description="Authenticated /v1 requests per minute per tenant, shared by every API "
        "process (a burst of one minute's worth, then this rate); beyond it 429. 0 = off.",
    )
    tenant_max_queued: int = Field(
        default=0,
        ge=0,
        description="Queued + running jobs a tenant may have; a submission or retry that "
        "would exceed it answers 429 and stores nothing. 0 = off.",
    )
    # The SSRF guard of webhook URLs (pcq/ssrf.py, api/webhook_urls.py); true turns it off.
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhook URLs reach any address (loopback, private networks, cloud "
        "metadata, ...): for local use and tests only. Off: a URL must reach public addresses.",
    )
    # Signed webhooks (pcq/webhooks.py, pcq/repositories/webhooks.py, worker/webhook_net.py).
    webhook_secret_grace_seconds: int = Field(
        default=86400,
        ge=0,
        le=30 * 86400,
        description="After POST /v1/webhooks/secret/rotate, the replaced secret keeps signing "
        "(a second v1 entry) this long, so receivers can switch keys without dropping events.",
    )
    webhook_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300,
        description="Deadline of one webhook delivery attempt: lookup, connect, send and the "
        "answer's first 64 KiB.",
    )
    # Webhook deliveries (pcq/jobs/outbox.py, worker/deliverer.py).
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400],
        description="When a failed webhook delivery is tried again: seconds after its first "
        "failure, comma-separated (with jitter); after the last, the delivery is failed.",
    )
    webhook_max_inline_bytes: int = Field(
        default=262144,
        ge=1024,
        description="A job event carries the job's result when the job's JSON is at most this "
        "many bytes; else it carries the job without it, and a result_url.",
    )
    # Live progress (GET /v1/batches/{id}/events, api/events.py).
    sse_ping_seconds: float = Field(
        default=15.0,
        gt=0,
        description="A `: ping` comment is sent on an event stream this long after the last "
        "thing written, so proxies and clients see a live connection.",
    )
    # Cost and budgets (pcq/costs.py).
    # NoDecode: _merge_prices reads the JSON, so a bad text gets a message that names the setting.
    prices: Annotated[dict[str, ModelPrice], NoDecode] = Field(
        default_factory=default_prices,
        description="USD per model, JSON: "
        '`{"base": {"per_1k_requests": 10, "per_1m_prompt_tokens": 0, "per_1m_completion_tokens": 0}}`; '
        "a model left out keeps its default (Parallel's published prices, see Cost and budgets).",
    )
    sse_max_streams_per_tenant: int = Field(
        default=16,
        ge=1,
        description="Event streams one tenant may hold open at once, per API process; 429 beyond.",
    )

    @field_validator("upstream_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                # Say where, never what: the text holds secrets.
                raise ValueError("PCQ_UPSTREAM_KEYS is not valid JSON") from None
        return [{"key": part.strip()} for part in text.split(",") if part.strip()]

    @field_validator("prices", mode="before")
    @classmethod
    def _merge_prices(cls, value: Any) -> Any:
        """The defaults, with the models ``PCQ_PRICES`` names replaced; an unknown model is
        refused (a typo would otherwise price nothing)."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("PCQ_PRICES is not valid JSON") from None
        if not isinstance(value, dict):
            raise ValueError('PCQ_PRICES must be a JSON object: {"<model>": {"per_1k_requests": <USD>}, ...}')
        unknown = sorted(str(m) for m in value if m not in PRICED_MODELS)
        if unknown:
            raise ValueError(
                f"PCQ_PRICES: unknown model(s) {', '.join(unknown)}; use {', '.join(PRICED_MODELS)}"
            )
        return {**DEFAULT_PRICES, **value}

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            delays = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError("PCQ_WEBHOOK_RETRY_SCHEDULE: not comma-separated numbers of seconds") from None
        if any(not 0 <= d < 10**8 for d in delays) or delays != sorted(delays):
            raise ValueError("PCQ_WEBHOOK_RETRY_SCHEDULE: seconds must be non-negative and ascending")
        return delays

    @field_validator("database_url")
    @classmethod
    def _normalize_db(cls, value: str) -> str:
        return normalize_database_url(value)

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.visibility_timeout_seconds <= self.total_timeout_seconds:
            raise SettingsError(
                "PCQ_VISIBILITY_TIMEOUT_SECONDS must exceed PCQ_TOTAL_TIMEOUT_SECONDS, "
                "or the broker re-delivers messages of calls still running"
            )
        return self

    def key_pool(self) -> list[KeyPolicy]:
        """Every upstream key the workers spread calls over, with its limits resolved.

        ``PARALLEL_API_KEY`` comes first (with the global limits), then ``PCQ_UPSTREAM_KEYS``.
        With no key at all the pool is one empty key (the local stand-in needs none).
        """
        entries: list[tuple[str, UpstreamKey | None]] = []
        if self.parallel_api_key is not None:
            entries.append((self.parallel_api_key.get_secret_value(), None))
        entries += [(k.key.get_secret_value(), k) for k in self.upstream_keys]
        if not entries:
            entries.append(("", None))
        pool: list[KeyPolicy] = []
        seen: set[str] = set()
        for position, (key, entry) in enumerate(entries):
            ident = key_id(key)
            if ident in seen:
                raise SettingsError(f"upstream key #{position + 1} is configured twice")
            seen.add(ident)

            limit = entry.rate_limit_per_minute if entry else None
            burst = entry.rate_limit_burst if entry else None
            cap = entry.max_in_flight if entry else None
            pool.append(
                KeyPolicy(
                    key=key,
                    id=ident,
                    rate_limit_per_minute=self.rate_limit_per_minute if limit is None else limit,
                    rate_limit_burst=self.rate_limit_burst if burst is None else burst,
                    max_in_flight=self.max_in_flight_per_key if cap is None else cap,
                )
            )
        return pool

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        if self.redis_url:
            return self.redis_url
        # The embedded broker: kombu's SQLAlchemy transport on an SQLite file beside the
        # database. Durable, shared by every process on the host, needs no server.
        return f"sqla+sqlite:///{Path('pcq-broker.sqlite3').absolute()}"

    @property
    def embedded(self) -> bool:
        return self.redis_url is None


_KNOWN_ENV = {str(f.validation_alias).upper() for f in Settings.model_fields.values()}


class _Environment(EnvSettingsSource):
    """pydantic-settings' reading of environment variables (aliases, case, decoding), from a
    given mapping: ``os.environ`` in production, a test's own dict in tests."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment, refusing unknown ``PCQ_`` variables; ``overrides``
    are by field name."""
    env = os.environ if environ is None else environ
    # pydantic-settings ignores variables no field asks for; a typo must not pass unnoticed.
    unknown = sorted(k for k in env if k.upper().startswith("PCQ_") and k.upper() not in _KNOWN_ENV)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}; see the README's table")
    try:
        values = _Environment(env)()
        values.update({str(Settings.model_fields[name].validation_alias): v for name, v in overrides.items()})
        settings = Settings.model_validate(values)
        settings.key_pool()  # duplicate keys are a configuration error, found at start
    except ValidationError as exc:
        # pydantic's message repeats the offending input, which may be an API key.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise SettingsError(f"invalid settings: {problems}") from None
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
