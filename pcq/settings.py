"""Process configuration: one pydantic-settings class, read once at process start.

Nothing else in the project reads ``os.environ``. Unknown ``PCQ_*`` variables are an
error (a typo such as ``PCQ_RATE_LIMT_PER_MINUTE`` must not be silently ignored).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class Settings(BaseSettings):
    """Every setting of every pcq process. See the README's configuration table."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, populate_by_name=True)

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

    rate_limit_per_minute: int = Field(default=300, ge=1, validation_alias="PCQ_RATE_LIMIT_PER_MINUTE")
    rate_limit_burst: int = Field(default=5, ge=0, validation_alias="PCQ_RATE_LIMIT_BURST")
    max_attempts: int = Field(default=5, ge=1, le=50, validation_alias="PCQ_MAX_ATTEMPTS")
    retry_base_seconds: float = Field(default=1.0, gt=0, validation_alias="PCQ_RETRY_BASE_SECONDS")
    retry_max_seconds: float = Field(default=60.0, gt=0, validation_alias="PCQ_RETRY_MAX_SECONDS")

    connect_timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="PCQ_CONNECT_TIMEOUT_SECONDS")
    read_timeout_seconds: float = Field(
        default=360.0,
        gt=0,
        validation_alias="PCQ_READ_TIMEOUT_SECONDS",
        description="Longest silence allowed between bytes of an upstream answer.",
    )
    total_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        validation_alias="PCQ_TOTAL_TIMEOUT_SECONDS",
        description="Deadline for one upstream call; `core` can take 5 minutes.",
    )
    max_response_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, validation_alias="PCQ_MAX_RESPONSE_BYTES"
    )

    lease_seconds: float = Field(default=120.0, gt=0, validation_alias="PCQ_LEASE_SECONDS")
    sweep_interval_seconds: float = Field(default=2.0, gt=0, validation_alias="PCQ_SWEEP_INTERVAL_SECONDS")
    requeue_after_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias="PCQ_REQUEUE_AFTER_SECONDS",
        description="A queued job whose message was sent this long ago is sent again.",
    )
    max_in_flight: int = Field(default=2000, ge=1, validation_alias="PCQ_MAX_IN_FLIGHT")
    worker_concurrency: int = Field(default=8, ge=1, validation_alias="PCQ_WORKER_CONCURRENCY")
    visibility_timeout_seconds: int = Field(
        default=3600, ge=60, validation_alias="PCQ_VISIBILITY_TIMEOUT_SECONDS"
    )
    queue_name: str = Field(default="pcq", validation_alias="PCQ_QUEUE_NAME")
    broker_url: str | None = Field(
        default=None,
        validation_alias="PCQ_BROKER_URL",
        description="Override the Celery broker (default: REDIS_URL, else an SQLite file).",
    )

    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, validation_alias="PCQ_MAX_REQUEST_BYTES")
    max_batch_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, validation_alias="PCQ_MAX_BATCH_BYTES")
    max_batch_lines: int = Field(default=100_000, ge=1, validation_alias="PCQ_MAX_BATCH_LINES")
    key_pepper: SecretStr = Field(
        default=SecretStr(""),
        validation_alias="PCQ_KEY_PEPPER",
        description="Optional secret mixed into API-key hashes.",
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias="PCQ_API_URL",
        description="Where `pcq submit` and `pcq export` find the API.",
    )
    api_key: SecretStr | None = Field(
        default=None, validation_alias="PCQ_API_KEY", description="Key for `pcq submit`/`export`."
    )
    log_level: str = Field(default="INFO", validation_alias="PCQ_LOG_LEVEL")

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


_KNOWN_ENV = {
    (f.validation_alias if isinstance(f.validation_alias, str) else name).upper()
    for name, f in Settings.model_fields.items()
}


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment, refusing unknown ``PCQ_`` variables."""
    env = dict(os.environ if environ is None else environ)
    unknown = sorted(k for k in env if k.upper().startswith("PCQ_") and k.upper() not in _KNOWN_ENV)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}; see the README's table")
    values: dict[str, Any] = {k: v for k, v in env.items() if k.upper() in _KNOWN_ENV}
    values.update(overrides)
    # Values come from the dict, not from pydantic-settings' own environment reading, so
    # that tests can pass an explicit environment.
    return Settings.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
