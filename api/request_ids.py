"""Every request gets an id: the caller's ``X-Request-ID`` if it is a sane one, else a new one.
It is bound for the request's log lines (pcq.logs), stored on the jobs the request creates
(api.intake) so the worker's lines for them carry it too, and echoed in the response's
``X-Request-ID`` header, on every response, errors included.

A pure ASGI middleware, wrapped around the whole app (outside Starlette's error middleware, so a
500 carries the header too, and uvicorn's access line, written as the response starts, has the
id): Starlette's BaseHTTPMiddleware would run the app in another task, out of reach of the
context it binds, and buffer streamed responses.
"""

from __future__ import annotations

import re
import uuid

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcq import logs

HEADER = b"x-request-id"
MAX_LENGTH = 64  # jobs.request_id holds 64 characters
# An HTTP token (RFC 9110 tchar): no space, quote, control character or non-ASCII byte, so the
# id cannot break a log line or a header, whatever the caller sent.
_SANE = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's ``X-Request-ID`` (the first one) when it is a token of at most 64
    characters; otherwise a new id (32 hex digits). An insane one is replaced, never echoed."""
    for name, value in headers:
        if name == HEADER:
            if _SANE.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope.get("headers", []))
        # Not reset afterwards: uvicorn runs each request in a task of its own (so the binding
        # ends with it), and logs an unhandled error after the app returns, still in that task.
        logs.bind(request_id=rid, tenant=None, job_id=None, batch_id=None, attempt=None)
        header = (HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() != HEADER]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def install(app: FastAPI) -> None:
    """Wrap the app's whole middleware stack (built on its first request) in RequestIds."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIds(build())  # type: ignore[method-assign]
