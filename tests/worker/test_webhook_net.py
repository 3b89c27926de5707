"""The sender of webhooks (worker/webhook_net.py) against real aiohttp receivers on 127.0.0.1,
and its SSRF guard at delivery.

Traffic goes only to 127.0.0.1: names resolve through an injected lookup, never over DNS, and
every other address class is checked by tests that open no connection (the guard refuses
before connecting, or the resolver is asked directly)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aiohttp import web
from multidict import CIMultiDict
from standardwebhooks.webhooks import Webhook

from pcq.webhooks import new_secret, signed_headers
from worker.webhook_net import (
    MAX_KEPT_BYTES,
    MAX_READ_BYTES,
    PostResult,
    Refused,
    VettingResolver,
    WebhookPoster,
)

T = TypeVar("T")
BODY = b'{"type": "job.succeeded", "timestamp": "2026-11-29T19:00:00Z", "data": {"id": "job_1"}}'
PUBLIC = "93.184.215.14"  # answered by the fake lookups below, never connected to
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Receiver:
    port: int
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends hanging handlers

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@asynccontextmanager
async def receiver(handler: Handler | None = None) -> AsyncIterator[Receiver]:
    """An aiohttp server on a free 127.0.0.1 port that records every request it reads and
    counts the connections it accepts; ``handler`` answers (default: 200 "ok")."""

    async def default(_: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    answer = handler or default
    state: dict[str, Receiver] = {}

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state["r"].requests.append(Received(request.method, request.path, CIMultiDict(request.headers), body))
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    factory = runner.server
    assert factory is not None

    def counting() -> Any:
        state["r"].connections += 1
        return factory()

    server = await asyncio.get_running_loop().create_server(counting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state["r"] = rec = Receiver(port)
    try:
        yield rec
    finally:
        rec.release.set()
        server.close()
        await runner.cleanup()


class Lookups:
    """An injected lookup: names answer from ``table``; every call is recorded."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


async def post_once(
    url: str, *, allow_private: bool, timeout: float = 5.0, lookup: Lookups | None = None
) -> PostResult:
    """One post through a new poster. Names resolve only through ``lookup`` (by default one
    that knows no name): no test asks the system's resolver."""
    poster = WebhookPoster(allow_private=allow_private, timeout=timeout, lookup=lookup or Lookups({}))
    try:
        return await poster.post(url, BODY, signed_headers([new_secret()], "evt_1", int(time.time()), BODY))
    finally:
        await poster.close()


# --- delivery, to a receiver on 127.0.0.1 (allow_private=True)


def test_a_post_arrives_with_the_exact_body_and_headers_and_verifies() -> None:
    secret = new_secret()

    async def go() -> tuple[PostResult, Receiver, dict[str, str]]:
        async with receiver() as rec:
            headers = signed_headers([secret], "evt_42", int(time.time()), BODY)
            poster = WebhookPoster(allow_private=True, timeout=5, lookup=Lookups({}))
            try:
                result = await poster.post(rec.url(), BODY, headers)
            finally:
                await poster.close()
            return result, rec, headers

    result, rec, headers = run(go())
    assert result.status_code == 200
    assert result.error is None
    assert result.body_excerpt == "ok"
    assert result.retry_after is None
    assert result.latency_ms >= 0
    [got] = rec.requests
    assert got.method == "POST"
    assert got.path == "/hook"
    assert got.body == BODY
    for name, value in headers.items():
        assert got.headers[name] == value
    assert "Cookie" not in got.headers
    assert Webhook(secret).verify(got.body, dict(got.headers)) == {
        "type": "job.succeeded",
        "timestamp": "2026-11-29T19:00:00Z",
        "data": {"id": "job_1"},
    }


@pytest.mark.parametrize("status", [201, 202, 204])
def test_any_2xx_is_success(status: int) -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=status)

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert (result.status_code, result.error) == (status, None)


def test_a_500_is_a_failure_with_its_status_and_body() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="database is down")

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert result.status_code == 500
    assert result.error == "http_500"
    assert result.body_excerpt == "database is down"
    assert result.retry_after is None


def test_a_429_with_retry_after_gives_its_seconds() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "7"})

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert (result.status_code, result.error, result.retry_after) == (429, "http_429", 7.0)


def test_a_503_with_retry_after_as_an_http_date() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
        return web.Response(status=503, headers={"Retry-After": when})

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert result.status_code == 503
    assert result.retry_after is not None
    assert 110 <= result.retry_after <= 121


def test_retry_after_counts_only_on_429_and_503() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=500, headers={"Retry-After": "7"})

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    assert run(go()).retry_after is None


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_failure_and_is_not_followed(status: int) -> None:
    async def go() -> tuple[PostResult, Receiver, Receiver]:
        async with receiver() as elsewhere:

            async def answer(_: web.Request) -> web.StreamResponse:
                return web.Response(status=status, headers={"Location": elsewhere.url("/landed")})

            async with receiver(answer) as rec:
                return await post_once(rec.url(), allow_private=True), rec, elsewhere

    result, rec, elsewhere = run(go())
    assert result.status_code == status
    assert result.error == "redirect"
    assert len(rec.requests) == 1
    assert elsewhere.connections == 0
    assert elsewhere.requests == []


def test_a_1_mb_answer_is_read_only_up_to_64_kib_and_1_kib_kept() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(body=b"a" * 1024 * 1024)

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert (result.status_code, result.error) == (200, None)
    assert result.body_excerpt == "a" * MAX_KEPT_BYTES


def test_an_endless_answer_is_cut_after_64_kib_not_read_to_the_deadline() -> None:
    """The receiver streams for as long as anyone reads: only a bounded read returns at once."""
    sent: list[int] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        total = 0
        try:
            while total < 64 * 1024 * 1024:
                await resp.write(b"b" * 16384)
                total += 16384
        finally:
            sent.append(total)
        return resp

    async def go() -> tuple[PostResult, float]:
        async with receiver(answer) as rec:
            started = time.monotonic()
            result = await post_once(rec.url(), allow_private=True, timeout=10)
            return result, time.monotonic() - started

    result, elapsed = run(go())
    assert (result.status_code, result.error) == (200, None)
    assert result.body_excerpt == "b" * MAX_KEPT_BYTES
    assert elapsed < 5
    assert sent
    assert sent[0] < 64 * 1024 * 1024  # the connection was dropped, not read to the end
    assert MAX_READ_BYTES == 64 * 1024


def test_an_answer_that_is_not_utf8_is_kept_with_replacement_characters() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=b"bad \xff\xfe input")

    async def go() -> PostResult:
        async with receiver(answer) as rec:
            return await post_once(rec.url(), allow_private=True)

    result = run(go())
    assert result.error == "http_400"
    assert result.body_excerpt == "bad \ufffd\ufffd input"


def test_a_receiver_that_hangs_times_out_within_the_timeout() -> None:
    async def go() -> tuple[PostResult, float]:
        rec_box: dict[str, Receiver] = {}

        async def answer(_: web.Request) -> web.StreamResponse:
            await rec_box["r"].release.wait()
            return web.Response(text="too late")

        async with receiver(answer) as rec:
            rec_box["r"] = rec
            started = time.monotonic()
            result = await post_once(rec.url(), allow_private=True, timeout=0.5)
            return result, time.monotonic() - started

    result, elapsed = run(go())
    assert result.status_code is None
    assert result.error == "timeout"
    assert 0.45 <= elapsed < 1.5
    assert 450 <= result.latency_ms < 1500


def test_a_refused_connection_is_connect() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result = run(post_once(f"http://127.0.0.1:{port}/hook", allow_private=True))
    assert result.status_code is None
    assert result.error == "connect"


def test_a_name_that_does_not_resolve_is_dns() -> None:
    lookup = Lookups({})
    result = run(post_once("https://nx.example.test/hook", allow_private=False, lookup=lookup))
    assert (result.status_code, result.error) == (None, "dns")
    assert lookup.calls == [("nx.example.test", 443)]


@pytest.mark.parametrize("url", ["http:///nohost", "http://[::1/hook", "http://host:99999/"])
def test_a_url_that_cannot_be_parsed_is_invalid_url(url: str) -> None:
    lookup = Lookups({})
    result = run(post_once(url, allow_private=True, lookup=lookup))
    assert (result.status_code, result.error) == (None, "invalid_url")
    assert lookup.calls == []


def test_a_url_without_a_scheme_is_refused() -> None:
    assert run(post_once("hooks.example.test/hook", allow_private=True)).error == "ssrf_refused"


def test_no_cookie_is_kept_from_one_post_for_the_next() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        resp = web.Response(text="ok")
        resp.set_cookie("session", "from-the-receiver")
        return resp

    async def go() -> Receiver:
        async with receiver(answer) as rec:
            # A name: a cookie jar keeps no cookie for an address, so only a name tests it.
            lookup = Lookups({"hooks.example.test": ["127.0.0.1"]})
            poster = WebhookPoster(allow_private=True, timeout=5, lookup=lookup)
            try:
                for _ in range(2):
                    assert (await poster.post(rec.url(host="hooks.example.test"), BODY, {})).error is None
            finally:
                await poster.close()
            return rec

    rec = run(go())
    assert len(rec.requests) == 2
    assert all("Cookie" not in r.headers for r in rec.requests)


def test_no_proxy_is_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> tuple[PostResult, Receiver, Receiver]:
        async with receiver() as proxy, receiver() as rec:
            for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
                monkeypatch.setenv(name, proxy.url("/"))
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            return await post_once(rec.url(), allow_private=True), rec, proxy

    result, rec, proxy = run(go())
    assert result.error is None
    assert len(rec.requests) == 1
    assert proxy.connections == 0


def test_many_posts_are_in_flight_at_once_on_one_poster() -> None:
    async def answer(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(text="ok")

    async def go() -> tuple[list[PostResult], float]:
        async with receiver(answer) as rec:
            poster = WebhookPoster(allow_private=True, timeout=10, lookup=Lookups({}))
            started = time.monotonic()
            try:
                results = await asyncio.gather(*(poster.post(rec.url(f"/{i}"), BODY, {}) for i in range(100)))
            finally:
                await poster.close()
            return list(results), time.monotonic() - started

    results, elapsed = run(go())
    assert [r.error for r in results] == [None] * 100
    assert elapsed < 3  # 100 x 0.3 s one after another would be 30 s


# --- the SSRF guard at delivery (allow_private=False)


def test_a_url_naming_127_0_0_1_is_refused_and_the_receiver_gets_no_connection() -> None:
    async def go() -> tuple[list[PostResult], Receiver]:
        async with receiver() as rec:
            urls = [
                rec.url(),
                rec.url(host="127.1"),
                rec.url(host="2130706433"),
                rec.url(host="0x7f.0.0.1"),
                rec.url(host="[::ffff:127.0.0.1]"),
                rec.url(host="localhost"),
            ]
            return [await post_once(url, allow_private=False) for url in urls], rec

    results, rec = run(go())
    assert [r.error for r in results] == ["ssrf_refused"] * 6
    assert all(r.status_code is None for r in results)
    assert rec.connections == 0


def test_a_name_that_resolves_to_127_0_0_1_is_refused_and_the_receiver_gets_nothing() -> None:
    lookup = Lookups({"hooks.example.test": ["127.0.0.1"]})

    async def go() -> tuple[PostResult, Receiver]:
        async with receiver() as rec:
            return await post_once(
                rec.url(host="hooks.example.test"), allow_private=False, lookup=lookup
            ), rec

    result, rec = run(go())
    assert (result.status_code, result.error) == (None, "ssrf_refused")
    assert rec.connections == 0
    assert len(lookup.calls) == 1


def test_a_name_that_resolves_to_a_public_and_a_private_address_is_refused() -> None:
    lookup = Lookups({"mixed.example.test": [PUBLIC, "127.0.0.1"]})

    async def go() -> tuple[PostResult, Receiver]:
        async with receiver() as rec:
            return await post_once(
                rec.url(host="mixed.example.test"), allow_private=False, lookup=lookup
            ), rec

    result, rec = run(go())
    assert (result.status_code, result.error) == (None, "ssrf_refused")
    assert rec.connections == 0


def test_allow_private_connects_to_the_address_the_one_lookup_returned() -> None:
    """The connection goes where the vetting lookup said: the name exists only in the injected
    table (no other resolver knows it), and the table was asked exactly once."""
    lookup = Lookups({"hooks.example.test": ["127.0.0.1"]})

    async def go() -> tuple[PostResult, Receiver]:
        async with receiver() as rec:
            url = rec.url(host="hooks.example.test")
            return await post_once(url, allow_private=True, lookup=lookup), rec

    result, rec = run(go())
    assert (result.status_code, result.error) == (200, None)
    [got] = rec.requests
    assert got.headers["Host"] == f"hooks.example.test:{rec.port}"  # the name, not the address
    assert lookup.calls == [("hooks.example.test", rec.port)]


def test_each_new_connection_resolves_again() -> None:
    """No DNS cache: a connection opened later asks the lookup again (a cached answer would be
    an address checked for some other, earlier delivery). The receiver closes each
    connection, so the second post needs a new one."""
    lookup = Lookups({"hooks.example.test": ["127.0.0.1"]})

    async def answer(_: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Connection": "close"})

    async def go() -> tuple[list[PostResult], Receiver]:
        async with receiver(answer) as rec:
            poster = WebhookPoster(allow_private=True, timeout=5, lookup=lookup)
            try:
                url = rec.url(host="hooks.example.test")
                results = [await poster.post(url, BODY, {}) for _ in range(2)]
            finally:
                await poster.close()
            return results, rec

    results, rec = run(go())
    assert [r.error for r in results] == [None, None]
    assert rec.connections == 2
    assert len(lookup.calls) == 2


@pytest.mark.parametrize(
    "url", ["ftp://hooks.example.test/x", "file:///etc/passwd", "gopher://127.0.0.1:70/"]
)
def test_other_schemes_are_refused_even_with_allow_private(url: str) -> None:
    lookup = Lookups({})
    assert run(post_once(url, allow_private=True, lookup=lookup)).error == "ssrf_refused"
    assert lookup.calls == []


# --- other address classes: refused before any connection (pure: nothing is opened)

REFUSED_LITERALS = [
    "http://10.0.0.1/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://255.255.255.255/hook",
    "http://240.0.0.1/hook",
    "https://192.0.2.10/hook",
    "https://198.18.0.1/hook",
    "http://[::1]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/hook",
    "http://[64:ff9b::a9fe:a9fe]/hook",
    "http://[2002:7f00:1::1]/hook",
    "http://[2001::1]/hook",
    "http://[ff02::1]/hook",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://printer.local/hook",
    "http://db:5432/hook",
    "https://user:secret@hooks.example.test/hook",
    "https://hooks.example.test:22/hook",
]


@pytest.mark.parametrize("url", REFUSED_LITERALS)
def test_non_public_targets_are_refused_before_any_lookup_or_connection(url: str) -> None:
    lookup = Lookups({})
    result = run(post_once(url, allow_private=False, lookup=lookup))
    assert (result.status_code, result.error) == (None, "ssrf_refused")
    assert lookup.calls == []


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.0.0.5"],
        ["169.254.169.254"],
        ["100.64.0.1"],
        ["192.168.0.10"],
        ["0.0.0.0"],
        ["::1"],
        ["fe80::1"],
        ["fc00::1"],
        ["::ffff:127.0.0.1"],
        ["64:ff9b::a9fe:a9fe"],
        [PUBLIC, "10.0.0.1"],
        ["2606:4700::1111", "fd00::1"],
        [],
        ["not-an-address"],
    ],
)
def test_the_resolver_refuses_any_non_public_answer(addresses: list[str]) -> None:
    resolver = VettingResolver(Lookups({"hooks.example.test": addresses}), allow_private=False)
    with pytest.raises((Refused, socket.gaierror)):
        run(resolver.resolve("hooks.example.test", 443))


def test_the_resolver_returns_exactly_the_public_addresses_it_checked() -> None:
    lookup = Lookups({"hooks.example.test": [PUBLIC, "2606:4700::1111", PUBLIC]})
    resolver = VettingResolver(lookup, allow_private=False)
    results = run(resolver.resolve("hooks.example.test", 443))
    assert [(r["host"], r["port"], r["family"], r["hostname"]) for r in results] == [
        (PUBLIC, 443, socket.AF_INET, "hooks.example.test"),
        ("2606:4700::1111", 443, socket.AF_INET6, "hooks.example.test"),
    ]
    assert lookup.calls == [("hooks.example.test", 443)]


@pytest.mark.parametrize(
    "host", ["0x7f.1", "017700000001", "127.0.0.1.", "localhost", "LOCALHOST.", "metadata"]
)
def test_the_resolver_refuses_local_spellings_without_a_lookup(host: str) -> None:
    lookup = Lookups({})
    with pytest.raises(Refused):
        run(VettingResolver(lookup, allow_private=False).resolve(host, 80))
    assert lookup.calls == []


def test_the_resolver_with_allow_private_returns_what_the_lookup_said() -> None:
    lookup = Lookups({"hooks.example.test": ["10.0.0.5", "::1"]})
    results = run(VettingResolver(lookup, allow_private=True).resolve("hooks.example.test", 8080))
    assert [r["host"] for r in results] == ["10.0.0.5", "::1"]
