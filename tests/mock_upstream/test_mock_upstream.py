"""Tests for the mock upstream, in-process on 127.0.0.1 via aiohttp's test server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mock_upstream import COMPLETIONS_PATH, MockConfig, create_app

KEY = {"x-api-key": "test-key"}


def run(config: MockConfig, body: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(create_app(config))) as client:
            await body(client)

    asyncio.run(main())


def fast(**kw: Any) -> MockConfig:
    return MockConfig(latency_ms=0, seed=1, **kw)


def req(content: str, model: str = "base", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def post(client: TestClient[Any, Any], payload: Any, headers: Any = None) -> Any:
    return await client.post(COMPLETIONS_PATH, json=payload, headers=KEY if headers is None else headers)


async def stats(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get("/mock/stats")
    result: dict[str, Any] = await resp.json()
    return result


def sse_events(raw: str) -> list[str]:
    return [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]


def test_text_answer_has_one_output_basis_entry() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resp = await post(client, req("What is the capital of France?"))
        assert resp.status == 200
        assert resp.headers["x-request-id"]
        data = await resp.json()
        assert data["object"] == "chat.completion"
        assert data["id"].startswith("chatcmpl-")
        assert "interaction_id" in data
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"].startswith("Answer about: What is the capital")
        assert choice["delta"]["content"] == choice["message"]["content"]
        assert [b["field"] for b in data["basis"]] == ["output"]
        entry = data["basis"][0]
        assert len(entry["citations"]) == 3
        assert all(c["url"].startswith("https://") for c in entry["citations"])
        assert entry["confidence"] in {"low", "medium", "high"}
        usage = data["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    run(fast(), body)


def test_content_is_deterministic_per_prompt() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        first = await (await post(client, req("same question"))).json()
        second = await (await post(client, req("same question"))).json()
        assert first["choices"] == second["choices"]
        assert first["basis"] == second["basis"]
        assert first["id"] != second["id"]

    run(fast(), body)


def test_citations_vary_domains_and_nullable_fields() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        citations = []
        for i in range(30):
            data = await (await post(client, req(f"question number {i}", model="core"))).json()
            citations += [c for b in data["basis"] for c in b["citations"]]
        domains = {c["url"].split("/")[2] for c in citations}
        assert len(domains) >= 5
        assert any(c["title"] is None for c in citations)
        assert any(c["excerpts"] is None for c in citations)
        assert any(c["excerpts"] for c in citations)

    run(fast(), body)


def test_json_schema_basis_has_one_entry_per_field() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "revenue": {"type": "number"},
            "employees": {"type": "integer"},
            "public": {"type": "boolean"},
            "products": {"type": "array", "items": {"type": "string"}},
            "hq": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tier": {"enum": ["a", "b"]},
        },
    }
    rf = {"type": "json_schema", "json_schema": {"name": "company", "schema": schema}}

    async def body(client: TestClient[Any, Any]) -> None:
        data = await (await post(client, req("Acme Corp", model="lite", response_format=rf))).json()
        content = json.loads(data["choices"][0]["message"]["content"])
        assert list(content) == list(schema["properties"])
        assert isinstance(content["name"], str)
        assert isinstance(content["revenue"], float)
        assert isinstance(content["employees"], int)
        assert isinstance(content["public"], bool)
        assert all(isinstance(x, str) for x in content["products"])
        assert isinstance(content["hq"]["city"], str)
        assert content["tier"] in {"a", "b"}
        assert [b["field"] for b in data["basis"]] == list(schema["properties"])

        rf_obj = {"type": "json_object"}
        data = await (await post(client, req("Acme", response_format=rf_obj))).json()
        content = json.loads(data["choices"][0]["message"]["content"])
        assert [b["field"] for b in data["basis"]] == list(content)

    run(fast(), body)


def test_speed_has_no_basis() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        for i in range(6):
            data = await (await post(client, req(f"quick {i}", model="speed"))).json()
            assert not data.get("basis")
            assert data["model"] == "speed"

    run(fast(), body)


def test_streaming_assembles_content_and_ends_with_done() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        expected = await (await post(client, req("stream me please"))).json()
        resp = await post(client, req("stream me please", stream=True))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.text())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 4
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == expected["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert [b["field"] for b in chunks[-1]["basis"]] == ["output"]
        assert chunks[-1]["usage"]["total_tokens"] > 0

    run(fast(), body)


def test_truncate_directive() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resp = await post(client, req("cut me [[mock:truncate,times=1]]", stream=True))
        events = sse_events(await resp.text())
        assert "[DONE]" not in events
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events)
        # times=1: the same content is served normally afterwards
        resp = await post(client, req("cut me [[mock:truncate,times=1]]", stream=True))
        assert sse_events(await resp.text())[-1] == "[DONE]"

        resp = await post(client, req("cut me [[mock:truncate]]"))
        assert resp.status == 200
        with pytest.raises(ValueError, match=r".+"):
            json.loads(await resp.read())

    run(fast(), body)


def test_malformed_null_usage_and_big_bytes_directives() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        for _ in range(5):
            resp = await post(client, req("bad [[mock:malformed]]"))
            assert resp.status == 200
            raw = await resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                continue
            assert "choices" not in parsed

        data = await (await post(client, req("x [[mock:null_usage]]"))).json()
        assert data.get("usage") is None

        resp = await post(client, req("big [[mock:big_bytes=300000]]"))
        raw = await resp.read()
        assert len(raw) == 300000
        assert json.loads(raw)["choices"]

    run(fast(), body)


def test_status_429_directive_with_retry_after_and_times() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        content = "limited [[mock:status=429,times=2]] [[mock:retry_after=2]]"
        for _ in range(2):
            resp = await post(client, req(content))
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"
            assert resp.headers["retry-after-ms"] == "2000"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        assert (await post(client, req(content))).status == 200

        resp = await post(client, req("down [[mock:status=503]]"))
        assert resp.status == 503
        assert (await resp.json())["error"]["ref_id"]

    run(fast(), body)


def test_hang_directive_makes_client_deadline_fire() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=0.3)
        with pytest.raises(asyncio.TimeoutError):
            await client.post(COMPLETIONS_PATH, json=req("[[mock:hang]]"), headers=KEY, timeout=timeout)
        for _ in range(50):  # the abandoned request must not stay in flight
            if (await stats(client))["in_flight"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await stats(client))["in_flight"] == 0

    run(fast(hang_seconds=30), body)


def test_latency_directive() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert (await post(client, req("slow [[mock:latency_ms=300]]"))).status == 200
        assert loop.time() - start >= 0.29

    run(fast(), body)


def test_auth() -> None:
    async def open_mode(client: TestClient[Any, Any]) -> None:
        assert (await post(client, req("hi"), headers={})).status == 401
        assert (await post(client, req("hi"), headers={"x-api-key": ""})).status == 401
        bearer = {"Authorization": "Bearer anything"}
        assert (await post(client, req("hi"), headers=bearer)).status == 200

    async def fixed_key(client: TestClient[Any, Any]) -> None:
        resp = await post(client, req("hi"), headers={"x-api-key": "wrong"})
        assert resp.status == 401
        assert "secret" not in await resp.text()
        assert (await post(client, req("hi"), headers={"x-api-key": "secret"})).status == 200
        bearer = {"Authorization": "Bearer secret"}
        assert (await post(client, req("hi"), headers=bearer)).status == 200
        assert (await post(client, req("hi"), headers={"x-api-key": "other"})).status == 200

    run(fast(), open_mode)
    run(fast(api_keys=("secret", "other")), fixed_key)


def test_unknown_model_is_403() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resp = await post(client, req("hi", model="ultra"))
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "invalid_request_error"

    run(fast(), body)


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"messages": []}, ["body", "model"]),
        ({"model": "base"}, ["body", "messages"]),
        ({"model": "base", "messages": [{"content": "x"}]}, ["body", "messages", 0, "role"]),
        ({"model": "base", "messages": [{"role": "user"}]}, ["body", "messages", 0, "content"]),
        ([1, 2], ["body"]),
    ],
)
def test_invalid_body_is_422(payload: Any, loc: list[Any]) -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resp = await post(client, payload)
        assert resp.status == 422
        detail = (await resp.json())["detail"]
        assert loc in [d["loc"] for d in detail]
        assert all({"loc", "msg", "type"} <= set(d) for d in detail)

    run(fast(), body)


def test_non_json_body_is_422() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resp = await client.post(COMPLETIONS_PATH, data=b"{not json", headers=KEY)
        assert resp.status == 422
        assert (await resp.json())["detail"][0]["type"] == "json_invalid"

    run(fast(), body)


def test_stats_and_reset() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        assert (await client.get("/healthz")).status == 200
        await post(client, req("a"))
        await post(client, req("b"))
        await post(client, req("c"), headers={})
        await post(client, req("d [[mock:status=500,times=1]]"))
        s = await stats(client)
        assert s["requests"] == 4
        assert s["by_status"] == {"200": 2, "401": 1, "500": 1}
        assert s["in_flight"] == 0
        assert s["max_in_flight"] >= 1
        assert len(s["by_content_hash"]) == 1

        assert (await client.post("/mock/reset")).status == 200
        s = await stats(client)
        assert s["requests"] == 0
        assert s["by_status"] == {}
        # the `times` memory is gone too: the directive fires again
        assert (await post(client, req("d [[mock:status=500,times=1]]"))).status == 500

    run(fast(), body)


def test_concurrent_requests_overlap() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        resps = await asyncio.gather(*(post(client, req(f"q{i}")) for i in range(50)))
        assert {r.status for r in resps} == {200}
        assert (await stats(client))["max_in_flight"] >= 10

    run(MockConfig(latency_ms=200, seed=1), body)


def test_enforce_rpm_rejects_the_excess() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        statuses = [(await post(client, req(f"q{i}"))).status for i in range(8)]
        assert statuses == [200] * 5 + [429] * 3
        resp = await post(client, req("one more"))
        assert resp.status == 429
        assert 0 < int(resp.headers["Retry-After"]) <= 60
        # the window is per key: another key still has its own quota
        assert (await post(client, req("other"), headers={"x-api-key": "k2"})).status == 200
        s = await stats(client)
        assert s["rate_limited_by_enforcer"] == 4
        assert s["by_status"]["429"] == 4

    run(fast(enforce_rpm=5), body)


def test_hung_request_is_released_even_without_handler_cancellation() -> None:
    # Embedders may run the app on a runner that does not cancel handlers on disconnect;
    # the mock must still notice the caller left instead of holding the request for an hour.
    async def main() -> None:
        runner = web.AppRunner(create_app(fast(hang_seconds=60)), handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession(headers=KEY) as session:
                timeout = aiohttp.ClientTimeout(total=0.2)
                with pytest.raises(asyncio.TimeoutError):
                    await session.post(base + COMPLETIONS_PATH, json=req("[[mock:hang]]"), timeout=timeout)
                for _ in range(40):
                    data = await (await session.get(base + "/mock/stats")).json()
                    if data["in_flight"] == 0:
                        break
                    await asyncio.sleep(0.1)
                assert data["in_flight"] == 0
                assert data["by_status"] == {"499": 1}
        finally:
            await runner.cleanup()

    asyncio.run(main())
