"""The domain's errors; the API renders each as ``{"error": code, "detail": message}``."""

from __future__ import annotations


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
