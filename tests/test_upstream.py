"""The upstream client against the real mock upstream: every outcome class, and no key leaks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from pcq.upstream import (
    Outcome,
    UpstreamClient,
    backoff_seconds,
    parse_retry_after,
    redact,
    summarize_error,
)
from tests.conftest import MockServer

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


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    delays = [backoff_seconds(n, 1.0, 8.0, None) for n in range(1, 8)]
    assert 0.75 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays)
    assert delays[4] >= 6.0
    assert 2.0 <= backoff_seconds(1, 1.0, 8.0, 2.0) <= 2.2
