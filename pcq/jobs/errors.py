"""The domain's errors; the API renders each as ``{"error": code, "detail": message}``."""

from __future__ import annotations

import math


class PcqError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(PcqError):
    code = "not_found"
    http_status = 404


class InvalidInput(PcqError):
    code = "invalid_request"
    http_status = 422


class IdempotencyMismatch(PcqError):
    code = "idempotency_key_reused"
    http_status = 422


class Conflict(PcqError):
    code = "conflict"
    http_status = 409


class TooLarge(PcqError):
    code = "too_large"
    http_status = 413


class Unauthorized(PcqError):
    code = "unauthorized"
    http_status = 401


class Unavailable(PcqError):
    code = "unavailable"
    http_status = 503


class TooManyRequests(PcqError):
    """429: the tenant must slow down; ``retry_after`` (whole seconds, >= 1) is sent as Retry-After."""

    code = "too_many_requests"
    http_status = 429

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = max(1, math.ceil(retry_after))


class RateLimited(TooManyRequests):
    code = "rate_limited"


class TooManyQueued(TooManyRequests):
    code = "too_many_queued"


class TooManyUploads(TooManyRequests):
    """429: too many batch uploads in progress (PCQ_MAX_UPLOADS_PER_TENANT, PCQ_MAX_UPLOADS)."""

    code = "too_many_uploads"


class TooManyStreams(TooManyRequests):
    """429: the tenant holds as many event streams as it may (PCQ_SSE_MAX_STREAMS_PER_TENANT)."""

    code = "too_many_streams"
