"""The upstream client against the real mock upstream: every outcome class, and no key leaks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from aiohttp import web

from pcq.jobs.lifecycle import backoff_seconds
from tests.conftest import MockServer
from worker.upstream import (
    PIECE_CHARS,
    RAW_ERROR_CHARS,
    Outcome,
    UpstreamClient,
    parse_retry_after,
    redact,
    redact_cut,
    summarize_error,
)

KEY = "sk-test-0123456789abcdef"


def call(
    mock: MockServer, content: str, *, total: float = 5.0, max_bytes: int = 1_000_000, **req: Any
) -> Outcome:
    async def go() -> Outcome:
        http = UpstreamClient.make_http_client(2.0, 2.0, 10)
        client = UpstreamClient(
            http, base_url=mock.url, api_key=KEY, total_timeout=total, max_response_bytes=max_bytes
        )
        try:
            body = {
                "model": req.pop("model", "lite"),
                "messages": [{"role": "user", "content": content}],
                **req,
            }
            return await client.call(json.dumps(body))
        finally:
            await http.close()

    return asyncio.run(go())


def test_plain_answer_is_parsed_with_basis_and_usage(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "plain question")
    assert out.kind == "ok"
    assert out.completion is not None
    assert out.completion.content
    assert out.completion.usage is not None
    assert out.completion.basis[0].field == "output"
    assert len(out.completion.basis[0].citations) == mock_upstream.config.citations_per_field
    assert out.upstream_request_id


def test_streamed_answer_is_assembled_and_raw_sse_kept(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "streamed question", stream=True, model="core")
    assert out.kind == "ok"
    assert out.completion is not None
    assert out.completion.finish_reason == "stop"
    assert out.completion.raw_body.rstrip().endswith("data: [DONE]")
    assert out.completion.basis


def test_json_schema_answer_is_parsed_with_one_basis_entry_per_field(mock_upstream: MockServer) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "p",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}},
        },
    }
    out = call(mock_upstream, "profile", response_format=fmt, model="base")
    assert out.completion is not None
    assert set(out.completion.parsed) == {"a", "b"}
    assert [b.field for b in out.completion.basis] == ["a", "b"]


def test_speed_answers_have_no_basis(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "quick", model="speed")
    assert out.completion is not None
    assert out.completion.basis == []


def test_null_usage_is_tolerated(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:null_usage]]")
    assert out.kind == "ok"
    assert out.completion is not None
    assert out.completion.usage is None


def test_429_is_retryable_and_carries_retry_after(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:status=429,retry_after=2]]")
    assert (out.kind, out.status_code, out.error_class) == ("retryable", 429, "rate_limited")
    assert out.retry_after == pytest.approx(2.0)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_server_errors_timeouts_and_conflicts_are_retryable(mock_upstream: MockServer, status: int) -> None:
    out = call(mock_upstream, f"q [[mock:status={status}]]")
    assert out.kind == "retryable"
    assert out.status_code == status


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
def test_client_errors_fail_at_once_with_a_safe_summary(mock_upstream: MockServer, status: int) -> None:
    out = call(mock_upstream, f"q [[mock:status={status}]]")
    assert out.kind == "fatal"
    assert out.summary is not None
    assert out.summary.startswith(f"upstream answered {status}")


def test_truncated_stream_is_never_a_success(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:truncate]]", stream=True)
    assert (out.kind, out.error_class) == ("retryable", "truncated")


def test_malformed_body_is_retryable_not_stored(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:malformed]]")
    assert out.kind == "retryable"
    assert out.error_class == "malformed"
    assert out.completion is None


def test_a_hung_upstream_hits_the_deadline(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:hang]]", total=1.0)
    assert (out.kind, out.error_class) == ("retryable", "timeout")
    assert (out.finished_at - out.started_at).total_seconds() < 3


def test_an_oversized_body_is_refused(mock_upstream: MockServer) -> None:
    out = call(mock_upstream, "q [[mock:big_bytes=3000000]]", max_bytes=1_000_000)
    assert (out.kind, out.error_class) == ("fatal", "too_large")


def test_connection_refused_is_retryable() -> None:
    out = call(MockServer("http://127.0.0.1:9", None), "q")  # type: ignore[arg-type]
    assert (out.kind, out.error_class) == ("retryable", "transport")


def test_the_api_key_never_appears_in_error_text() -> None:
    body = json.dumps({"error": {"message": f"bad key {KEY} for Authorization: Bearer {KEY}"}})
    text = redact(summarize_error(401, body), [KEY])
    assert KEY not in text
    assert "upstream answered 401" in text


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert parse_retry_after(httpx.Headers({"retry-after": "7"})) == 7.0
    assert (
        parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470.0)
        == 10.0
    )
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_retry_after_is_capped_and_nan_is_no_answer() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "99999"})) == 3600.0
    assert parse_retry_after(httpx.Headers({"retry-after": "7200"}), cap=86400.0) == 7200.0
    assert parse_retry_after(httpx.Headers({"retry-after": "inf"}), cap=86400.0) == 86400.0
    assert parse_retry_after(httpx.Headers({"retry-after": "nan"})) is None
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "nan"})) is None


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    delays = [backoff_seconds(n, 1.0, 8.0, None) for n in range(1, 8)]
    assert 0.75 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays)
    assert delays[4] >= 6.0
    assert 2.0 <= backoff_seconds(1, 1.0, 8.0, 2.0) <= 2.2


# An upstream key that looks like nothing (no `sk-`): only the pool's list of keys can find it.
OPAQUE = "Zq81opaqueUPSTREAMkey4a7Bc9dE"


def leaked_prefixes(text: str, key: str) -> list[str]:
    """Every start of ``key`` of 6 characters or more that ``text`` holds."""
    return [key[:n] for n in range(6, len(key) + 1) if key[:n] in text]


def answer(status: int, body: str, content_type: str, key: str) -> Outcome:
    """One call through the real client to a server that answers ``status`` with ``body``."""

    async def go() -> Outcome:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(status=status, text=body, content_type=content_type)

        app = web.Application()
        app.router.add_post("/v1beta/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        http = UpstreamClient.make_http_client(2.0, 2.0, 10)
        client = UpstreamClient(
            http,
            base_url=f"http://127.0.0.1:{port}",
            api_key=["sk-other-pool-key-000000", key],
            total_timeout=5.0,
            max_response_bytes=1_000_000,
        )
        try:
            return await client.call(json.dumps({"model": "lite", "messages": []}), key_index=1)
        finally:
            await http.close()
            await runner.cleanup()

    return asyncio.run(go())


def pieces(text: str, key: str, n: int = PIECE_CHARS) -> list[str]:
    """Every run of ``n`` characters of ``key`` that ``text`` holds."""
    return [key[i : i + n] for i in range(len(key) - n + 1) if key[i : i + n] in text]


@pytest.mark.parametrize("key", [KEY, OPAQUE])
def test_a_key_the_upstream_quotes_in_part_leaves_no_piece_of_itself(key: str) -> None:
    """Some APIs name the key they refused by its start or its end: no run of 8 of its
    characters is kept, in the summary or the raw body, and the rest of the message is."""
    message = f"key {key[:12]}… refused; key ending {key[-9:]} unknown; {key[4:13]}"
    out = answer(401, json.dumps({"error": {"message": message}}), "application/json", key)
    assert out.summary is not None
    assert out.raw_error is not None
    assert pieces(out.summary, key) == []
    assert pieces(out.raw_error, key) == []
    assert (
        out.summary
        == "upstream answered 401: key [redacted]… refused; key ending [redacted] unknown; [redacted]"
    )


@pytest.mark.parametrize("key", [KEY, OPAQUE])
@pytest.mark.parametrize("at", [190, 195, 199])
def test_a_key_across_the_summarys_cut_leaves_nothing_of_itself(key: str, at: int) -> None:
    """The message is cut to 200 characters after redaction: a key that straddles the cut is
    redacted whole, not cut to a stub the redaction no longer recognises."""
    message = "m" * at + key + " was refused"
    out = answer(401, json.dumps({"error": {"message": message}}), "application/json", key)
    assert out.kind == "fatal"
    assert out.summary is not None
    assert out.summary.startswith("upstream answered 401: " + "m" * at)
    assert leaked_prefixes(out.summary, key) == []
    assert out.raw_error is not None
    assert leaked_prefixes(out.raw_error, key) == []


@pytest.mark.parametrize("key", [KEY, OPAQUE])
@pytest.mark.parametrize("status", [401, 503, 200])
@pytest.mark.parametrize("tail", [100, 50_000])
def test_a_key_across_the_raw_errors_cut_leaves_nothing_of_itself(key: str, status: int, tail: int) -> None:
    """The raw body (an error, or a 200 that is no completion) is kept to 4000 characters after
    redaction, whatever its length."""
    body = "b" * (RAW_ERROR_CHARS - 7) + key + "c" * tail
    out = answer(status, body, "text/plain", key)
    assert out.kind in ("fatal", "retryable")
    assert out.raw_error is not None
    assert len(out.raw_error) <= RAW_ERROR_CHARS
    assert out.raw_error.startswith("b" * (RAW_ERROR_CHARS - 7) + "[redac")
    assert leaked_prefixes(out.raw_error, key) == []
    assert out.summary is not None
    assert leaked_prefixes(out.summary, key) == []


def test_redact_cut_never_keeps_the_start_of_a_key_wherever_the_key_falls() -> None:
    """Every position of a key around the cut and around the edge of the redacted window, with
    or without redactions before it (each one shortens the text), key listed or only key-shaped."""
    shaped = "sk-live-abcdefghijklmnop"  # in no list: the pattern finds it
    for key, secrets in ((OPAQUE, [OPAQUE]), (KEY, [KEY]), (shaped, [])):
        for limit in (10, 200, 4000):
            for before in (0, 3, 30):
                lead = (" " + key) * before
                for at in [*range(max(0, limit - 40), limit + 40), *range(2 * limit, 2 * limit + 140)]:
                    text = lead + " " * max(at - len(lead), 1) + key + " " + "t" * 500
                    out = redact_cut(text, secrets, limit)
                    assert len(out) <= limit
                    assert leaked_prefixes(out, key) == [], (key, limit, before, at)
                    assert redact(text, secrets).startswith(out)
