"""One call to ``POST /v1beta/chat/completions``, classified for the retry policy.

Never raises for upstream trouble: every call ends as an ``Outcome`` (ok / retryable /
fatal) that the worker records as an attempt. The API key is sent as ``x-api-key`` and as
``Authorization: Bearer`` (the docs disagree on which) and never appears in an error text.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from pcq.wire import (
    MalformedResponse,
    Outcome,
    ParsedCompletion,
    StreamAssembler,
    iter_sse_data,
    parse_completion,
)

CHAT_PATH = "/v1beta/chat/completions"
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_SECONDS = 3600.0
RAW_ERROR_CHARS = 4000  # an upstream error body is kept (redacted) up to this many characters
PIECE_CHARS = 8  # this many characters of a key in a row, anywhere in an error text, are redacted
_SECRETISH = re.compile(r"(?i)(bearer\s+|x-api-key[\"':\s]+)?\b(sk|pcq|key)[-_][A-Za-z0-9_\-]{8,}")


def parse_retry_after(
    headers: Mapping[str, str], now: float | None = None, *, cap: float = MAX_RETRY_AFTER_SECONDS
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date), at
    most ``cap``."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if value >= 0:  # False for NaN
                return min(value, cap)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        seconds = float(ra)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else min(max(seconds, 0.0), cap)
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), cap)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any of ``secrets``, whole or in part, nor anything shaped like a key.

    An upstream may quote part of the key it was sent ("keys beginning sk-abcd1234… are not
    valid"), so any run of ``PIECE_CHARS`` or more characters of a secret goes too."""
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
            if len(s) >= PIECE_CHARS:
                text = _redact_pieces(text, _pieces_of(s))
    return _SECRETISH.sub("[redacted]", text)


@functools.lru_cache(maxsize=64)
def _pieces_of(secret: str) -> re.Pattern[str]:
    """Where a ``PIECE_CHARS``-long piece of ``secret`` starts (a lookahead: overlapping)."""
    pieces = {secret[i : i + PIECE_CHARS] for i in range(len(secret) - PIECE_CHARS + 1)}
    return re.compile("(?=(?:" + "|".join(map(re.escape, sorted(pieces))) + "))")


def _redact_pieces(text: str, starts: re.Pattern[str]) -> str:
    """Each run of overlapping pieces becomes one ``[redacted]``."""
    out: list[str] = []
    kept = 0  # text[:kept] is decided
    run_start, run_end = -1, -1
    for m in starts.finditer(text):
        if m.start() > run_end:  # a new run: close the previous one
            if run_start >= 0:
                out += [text[kept:run_start], "[redacted]"]
                kept = run_end
            run_start = m.start()
        run_end = m.start() + PIECE_CHARS
    if run_start >= 0:
        out += [text[kept:run_start], "[redacted]"]
        kept = run_end
    return "".join(out) + text[kept:]


def redact_cut(text: str, secrets: Sequence[str], limit: int) -> str:
    """``redact(text, secrets)`` cut to at most ``limit`` characters.

    Redaction runs before the cut: cutting first would leave the start of a key that straddles
    the cut, too short to be recognised. Only a window of ``2 * limit + margin`` characters is
    redacted (a body may be megabytes, and this runs on the worker's event loop); as the
    window's own edge may split a key, its last ``margin`` characters (more than any key's
    unrecognised start) are never kept when the text went on past it. (Each redaction shortens
    the window, so a text dense with keys may come back shorter than ``limit``.)
    """
    margin = max([64, *(len(s) for s in secrets)])
    window_chars = 2 * limit + margin
    if len(text) <= window_chars:
        return redact(text, secrets)[:limit]
    window = redact(text[:window_chars], secrets)
    return window[: max(0, min(limit, len(window) - margin))]


def summarize_error(status: int, body: str, secrets: Sequence[str] = ()) -> str:
    """A short, safe description of an upstream error body, whatever its shape; ``secrets``
    (and anything shaped like a key) are redacted before the message is cut to 200 characters."""
    message: str | None = None
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message = err.get("message") or err.get("type") or err.get("ref_id")
        elif isinstance(err, str):
            message = err
        detail = data.get("detail")
        if message is None and isinstance(detail, list) and detail and isinstance(detail[0], dict):
            loc = ".".join(str(p) for p in detail[0].get("loc", []))
            message = f"{loc}: {detail[0].get('msg')}"
        elif message is None and isinstance(detail, str):
            message = detail
    text = f"upstream answered {status}"
    if message:
        text += f": {redact_cut(str(message), secrets, 200)}"
    return text


def response_format(request_json: str) -> dict[str, Any] | None:
    """The request's ``response_format``: how to read the answer's content (JSON or text)."""
    try:
        fmt = json.loads(request_json).get("response_format")
    except (ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, dict) else None


class BodyTooLarge(Exception):
    pass


class UpstreamClient:
    def __init__(
        self,
        client: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str | Sequence[str],
        total_timeout: float,
        max_response_bytes: int,
    ) -> None:
        """``api_key``: one key, or the pool's keys in order (``call``'s ``key_index``)."""
        self._client = client
        self._url = base_url.rstrip("/") + CHAT_PATH
        keys = [api_key] if isinstance(api_key, str) else list(api_key)
        self._secrets = [k for k in keys if k]  # never in a stored error, whichever key was used
        self._headers = [
            {"x-api-key": k, "Authorization": f"Bearer {k}", "Content-Type": "application/json"} for k in keys
        ]
        self._total_timeout = total_timeout
        self._max_bytes = max_response_bytes

    @staticmethod
    def make_http_client(connect: float, read: float, max_connections: int) -> aiohttp.ClientSession:
        """An aiohttp session: one connection pool for every call of the process.

        Measured on this machine: httpx's own pool (httpcore) spent ~40% of a worker's CPU at a
        few hundred calls in flight, as its cost grows with the number pending
        (encode/httpx#3215); httpx on aiohttp's pool (httpx-aiohttp) fixed that but still spent
        about a third of the worker's samples in httpx's request and response layers. aiohttp
        itself needs neither. Must be called with the event loop running.
        """
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read),
            raise_for_status=False,
        )

    async def call(self, request_json: str, key_index: int = 0) -> Outcome:
        """Send ``request_json`` (the submitted text, byte for byte) with the pool's key
        ``key_index``."""
        started = datetime.now(UTC)
        try:
            async with asyncio.timeout(self._total_timeout):
                return await self._call(request_json, started, self._headers[key_index])
        except aiohttp.ConnectionTimeoutError:  # a TimeoutError too: test it first
            return self._fail("retryable", started, "timeout", "upstream connect timed out")
        except aiohttp.ServerTimeoutError:
            return self._fail("retryable", started, "timeout", "upstream read timed out")
        except TimeoutError:
            return self._fail("retryable", started, "timeout", "upstream call exceeded its deadline")
        except aiohttp.ClientError as exc:
            return self._fail("retryable", started, "transport", f"connection problem: {type(exc).__name__}")
        except BodyTooLarge:
            return self._fail(
                "fatal",
                started,
                "too_large",
                f"upstream answer larger than {self._max_bytes} bytes",
            )

    def _fail(self, kind: str, started: datetime, cls: str, summary: str, **kw: Any) -> Outcome:
        return Outcome(
            kind=kind,
            started_at=started,
            finished_at=datetime.now(UTC),
            error_class=cls,
            summary=summary,
            **kw,
        )

    async def _read(self, response: aiohttp.ClientResponse) -> str:
        if (response.content_length or 0) > self._max_bytes:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")

    async def _call(self, request_json: str, started: datetime, headers: dict[str, str]) -> Outcome:
        payload = request_json.encode()
        async with self._client.post(self._url, data=payload, headers=headers, allow_redirects=False) as resp:
            request_id = resp.headers.get("x-request-id")
            body = await self._read(resp)
        status = resp.status
        if status == 200:
            fmt = response_format(request_json)
            try:
                if "text/event-stream" in resp.headers.get("content-type", ""):
                    completion = self._assemble_stream(body, fmt)
                else:
                    completion = parse_completion(body, fmt)
            except MalformedResponse as exc:
                cls = "truncated" if "truncated" in str(exc) else "malformed"
                return self._fail(
                    "retryable",
                    started,
                    cls,
                    f"upstream answer unusable: {exc}",
                    status_code=200,
                    raw_error=redact_cut(body, self._secrets, RAW_ERROR_CHARS),
                    upstream_request_id=request_id,
                )
            return Outcome(
                kind="ok",
                started_at=started,
                finished_at=datetime.now(UTC),
                completion=completion,
                status_code=200,
                upstream_request_id=request_id,
            )
        retryable = status in RETRYABLE_STATUS or status >= 500
        cls = "rate_limited" if status == 429 else ("server_error" if status >= 500 else "http_4xx")
        return self._fail(
            "retryable" if retryable else "fatal",
            started,
            cls,
            summarize_error(status, body, self._secrets),
            status_code=status,
            raw_error=redact_cut(body, self._secrets, RAW_ERROR_CHARS),
            retry_after=parse_retry_after(resp.headers) if retryable else None,
            upstream_request_id=request_id,
        )

    @staticmethod
    def _assemble_stream(body: str, fmt: dict[str, Any] | None) -> ParsedCompletion:
        assembler = StreamAssembler()
        for data in iter_sse_data(body):
            assembler.feed_data(data)
        if not assembler.complete:
            raise MalformedResponse("stream truncated: no [DONE] and no finish_reason")
        return assembler.result(body, fmt)
