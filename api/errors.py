"""One rendering for every error: ``{"error": "<code>", "detail": "<message>"}``."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcq.jobs.errors import PcqError, TooManyRequests

log = logging.getLogger(__name__)

ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "Missing or invalid API key",
    404: "No such object for this tenant",
    408: "The request body did not arrive within PCQ_UPLOAD_TIMEOUT_SECONDS; nothing was stored, and "
    "the connection is closed",
    409: "The object is not in a state that allows this",
    413: "The body (or one batch line) is too large; nothing was stored",
    422: "Invalid input; nothing was stored",
    429: "Too many requests for this tenant (`rate_limited`), or a submission or retry would take its "
    "queued and running jobs over their cap (`too_many_queued`), or too many batch uploads are in "
    "progress (`too_many_uploads`); nothing was stored. Or the tenant holds as many event streams as it "
    "may (`too_many_streams`). Retry after `Retry-After` seconds",
    503: "The database is unavailable; retry",
}
_ERROR_HEADERS: dict[int, dict[str, object]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}},
}


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` for the error statuses a route can answer, each an ErrorOut.

    Always ``application/json``, whatever the route's own media type (api.openapi adds ErrorOut
    to the document's components).
    """
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    out: dict[int | str, dict[str, object]] = {}
    for code in codes:
        doc: dict[str, object] = {"description": ERROR_DESCRIPTIONS[code], "content": content}
        if code in _ERROR_HEADERS:
            doc["headers"] = _ERROR_HEADERS[code]
        out[code] = doc
    return out


def error_body(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


def _unavailable() -> JSONResponse:
    return JSONResponse(
        error_body(
            "unavailable",
            "the database is unavailable; retry shortly (with the same Idempotency-Key "
            "for submissions, so a request that did land is not duplicated)",
        ),
        status_code=503,
        headers={"Retry-After": "5"},
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(PcqError)
    async def _domain(_: Request, exc: PcqError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.http_status, headers=headers)

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        name = type(exc.orig).__name__ if exc.orig else type(exc).__name__
        if isinstance(exc, DataError):
            # A value the database cannot hold that validation let through: bad input, and
            # retrying will not help, so never a 503. Nothing was stored (the transaction
            # rolled back).
            log.warning("database refused a value: %s", name)
            return JSONResponse(
                error_body("invalid_request", "a value cannot be stored (for example a NUL character)"),
                status_code=422,
            )
        if isinstance(exc, IntegrityError):
            log.warning("constraint violation: %s", name)
            return JSONResponse(
                error_body("conflict", "the request conflicts with stored data; nothing was stored"),
                status_code=409,
            )
        if not isinstance(exc, OperationalError | InterfaceError) and not exc.connection_invalidated:
            # A programming error is a bug, not an outage: say so rather than "retry".
            log.error("database error: %s", name, exc_info=exc)
            return JSONResponse(error_body("internal_error", "an internal error occurred"), status_code=500)
        # The database is down or restarting. A failure during commit is ambiguous (the
        # write may have landed), so the advice is to retry with the same Idempotency-Key.
        log.warning("database unavailable: %s", name)
        return _unavailable()

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_: Request, exc: PoolTimeout) -> JSONResponse:  # noqa: ARG001
        log.warning("database pool exhausted: no connection within the pool timeout")
        return _unavailable()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for err in errors[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(error_body("invalid_request", "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8): bad input, like invalid JSON.
            return JSONResponse(error_body("invalid_request", f"body: {exc.detail}"), status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            # RFC 9110: a 405 lists every method of the resource. Starlette's names only those of
            # the first route whose path matched, and GET and POST of a path are two routes here.
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """The methods some route answers for this path (asked of the router, however it nests)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    )


# Bodies that are batches (or batch input files, api.openai_compat): PCQ_MAX_BATCH_BYTES applies.
BATCH_PATHS = ("/v1/batches", "/openai/v1/files")


class BodyLimit:
    """Refuse bodies over a size with 413 before they are read into memory, and bodies that do
    not arrive in time with 408.

    Starlette has no body limit of its own; this checks Content-Length up front and counts
    the bytes of chunked uploads as they arrive. With ``upload_timeout`` (PCQ_UPLOAD_TIMEOUT_SECONDS)
    the whole body must arrive within that many seconds of the app's first read of it: a client
    that stalls gets 408 and its connection is closed, so it holds nothing any longer. Reads
    after the body's end (a streaming response listening for a disconnect) have no deadline.
    """

    def __init__(
        self, app: ASGIApp, *, default_limit: int, batch_limit: int, upload_timeout: float | None = None
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.batch_limit = batch_limit
        self.upload_timeout = upload_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        batch = scope["path"].startswith(BATCH_PATHS)
        limit = self.batch_limit if batch else self.default_limit
        setting = "PCQ_MAX_BATCH_BYTES" if batch else "PCQ_MAX_REQUEST_BYTES"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._too_large(send, limit, setting)
                    return
        received = 0
        rejected: int | None = None  # the status that replaces whatever the app answers
        deadline: float | None = None
        body_done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, rejected, deadline, body_done
            if body_done or self.upload_timeout is None:
                message = await receive()
            else:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.upload_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    rejected = 408
                    raise _Rejected from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    rejected = 413
                    raise _Rejected
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body overflowed or stalled, whatever the app answers (frameworks turn a
            # failed body read into their own error) is replaced by the 413 or 408.
            nonlocal started
            if rejected is None:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Rejected:
            pass
        if started:  # too late for another answer (a body sent beside a streamed response)
            return
        if rejected == 413:
            await self._too_large(send, limit, setting)
        elif rejected == 408:
            await self._timed_out(send)

    @staticmethod
    async def _too_large(send: Send, limit: int, setting: str) -> None:
        detail = f"request body exceeds {limit} bytes ({setting})"
        await _send_error(send, JSONResponse(error_body("too_large", detail), status_code=413))

    async def _timed_out(self, send: Send) -> None:
        detail = (
            f"the request body did not arrive within {self.upload_timeout:g} s "
            "(PCQ_UPLOAD_TIMEOUT_SECONDS); nothing was stored. Send it faster or in smaller batches"
        )
        # Connection: close makes the server drop the connection once the answer is sent.
        response = JSONResponse(
            error_body("request_timeout", detail), status_code=408, headers={"Connection": "close"}
        )
        await _send_error(send, response)


async def _send_error(send: Send, response: JSONResponse) -> None:
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


class RejectNul:
    """Answer 422 for a NUL character in the path or a query parameter, naming where it is.

    No identifier or filter of this API can contain one, and PostgreSQL cannot even compare
    with one: without this, such a lookup would fail in the database instead of as bad input.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(
            ("/v1", "/openai/v1")
        ):  # others read no input
            where = self._where(scope)
            if where is not None:
                body = JSONResponse(
                    error_body("invalid_request", f"{where}: must not contain a NUL (\\u0000) character"),
                    status_code=422,
                )
                await body(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _where(scope: Scope) -> str | None:
        if "\x00" in scope["path"]:
            return "path"
        query: bytes = scope.get("query_string", b"")
        if b"%00" in query or b"\x00" in query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if "\x00" in name or "\x00" in value:
                    return f"query parameter {name.replace(chr(0), '')!r}"
            return "query"
        return None


class _Rejected(Exception):
    """Raised into the app from its receive: its body is too large or arrived too late."""
