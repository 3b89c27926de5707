"""The sender of webhooks: one POST per delivery attempt, with the SSRF guard at delivery.

A worker holds one ``WebhookPoster`` (one aiohttp session and connection pool) and posts
many deliveries through it at once. ``post`` never raises for the receiver's trouble: every
attempt ends as a ``PostResult`` (status, latency, error class, an excerpt of the answer,
``Retry-After``) that the deliverer records and schedules on.

The guard (rules: pcq.ssrf; the check at submission: api/webhook_urls.py). A URL stored at
submission is never trusted: names change what they resolve to (DNS rebinding), so every
attempt checks again, and connects only to what it checked:

- the URL as the connection will use it (yarl's parse, which aiohttp connects by): scheme
  http(s), no user name or password, port 80, 443 or 1024-65535, a host that is no local
  name and, if a literal address, a public one (aiohttp opens literals without asking the
  resolver, so they are checked here, before the request);
- a name is resolved ONCE, by ``VettingResolver``, the connector's resolver: every address
  must be public (one private address refuses the URL), and the connector connects to the
  addresses it returns, those it checked: there is no second lookup. TLS SNI and ``Host``
  stay the URL's name. The connector keeps no DNS cache (``use_dns_cache=False``): each
  new connection resolves and checks afresh. A pooled keep-alive connection is reused only
  for its own host and port, and it goes to an address checked when it was opened;
- redirects are never followed (any 3xx is a failure, ``redirect``), no proxy is taken from
  the environment, and no cookie is kept from one receiver for another.

``allow_private`` (``PCQ_WEBHOOK_ALLOW_PRIVATE``) skips the address checks, for local use and
tests; the scheme must still be http(s).

Bounds: one deadline for the whole attempt (lookup, connect, send, answer), ``timeout``
(``PCQ_WEBHOOK_TIMEOUT_SECONDS``); at most ``MAX_READ_BYTES`` (64 KiB) of the answer read,
``MAX_KEPT_BYTES`` (1 KiB) kept; answers are asked for uncompressed and never decompressed
(a small compressed body cannot grow in memory).

Error classes (``PostResult.error``), None exactly when the receiver answered 2xx:

=================  ==============================================================
``http_<code>``    the receiver answered a status that is neither 2xx nor 3xx
``redirect``       it answered 3xx (not followed)
``timeout``        no complete answer within ``timeout`` (lookup, connect or read)
``dns``            the name does not resolve (or resolves to nothing)
``connect``        the connection was refused, reset or unreachable
``tls``            the TLS handshake failed (certificate, protocol)
``protocol``       the answer was not valid HTTP, or the connection closed mid-answer
``ssrf_refused``   the guard refused the URL or an address its name resolved to
``invalid_url``    the URL cannot be parsed or has no host
``error``          anything else the HTTP client raised
=================  ==============================================================
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pcq import ssrf
from worker.upstream import parse_retry_after

log = logging.getLogger(__name__)

MAX_READ_BYTES = 64 * 1024  # read at most this much of an answer
MAX_KEPT_BYTES = 1024  # keep at most this much of it (PostResult.body_excerpt)
MAX_RETRY_AFTER_SECONDS = 86400.0  # a receiver's Retry-After beyond a day is read as a day
RETRY_AFTER_STATUSES = frozenset({429, 503})

Lookup = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class PostResult:
    status_code: int | None  # None when no answer came (refused, DNS, connect, timeout)
    latency_ms: int
    error: str | None  # None on a 2xx; else a class of the table above
    body_excerpt: str  # at most MAX_KEPT_BYTES of the answer's body, decoded leniently
    retry_after: float | None  # seconds, from Retry-After on a 429 or 503


class Refused(Exception):
    """The guard refused the target. Not an OSError, so aiohttp passes it through unwrapped."""

    def __init__(self, cause: ssrf.NotPublic) -> None:
        super().__init__(str(cause))
        self.cause = cause


def system_lookup(loop: asyncio.AbstractEventLoop) -> Lookup:
    """The system's resolver (``getaddrinfo``: /etc/hosts, then DNS), in the loop's threads."""

    async def lookup(host: str, port: int) -> list[str]:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    return lookup


class VettingResolver(AbstractResolver):
    """The connector's resolver: one lookup per connection, every address checked (unless
    ``allow_private``), only checked addresses returned for the connector to connect to."""

    def __init__(self, lookup: Lookup, *, allow_private: bool) -> None:
        self._lookup = lookup
        self._allow_private = allow_private

    async def resolve(
        self,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,  # noqa: ARG002  (both families: the lookup's)
    ) -> list[ResolveResult]:
        try:
            literal = ssrf.parse_ip_host(host)  # a spelling aiohttp does not see as an address
            if literal is not None:
                if not self._allow_private:
                    ssrf.vet_host(host)
                addresses = [literal]
            else:
                if not self._allow_private:
                    ssrf.vet_name(host)
                answer = await self._lookup(host, port)
                if self._allow_private:
                    addresses = [ip_address(text) for text in dict.fromkeys(answer)]
                else:
                    addresses = ssrf.vet_addresses(host, answer)
        except ssrf.NotPublic as exc:
            raise Refused(exc) from None
        except ValueError:  # an answer that is no address: as good as none
            raise socket.gaierror(socket.EAI_NONAME, "no address") from None
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no address")
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class WebhookPoster:
    """One per worker: posts deliveries, many at once, through one pool of connections."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float,
        lookup: Lookup | None = None,
        max_connections: int = 512,
    ) -> None:
        self._allow_private = allow_private
        self._timeout = timeout
        self._lookup = lookup
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop the poster serves (aiohttp binds to it).
        if self._session is None:
            lookup = self._lookup or system_lookup(asyncio.get_running_loop())
            connector = aiohttp.TCPConnector(
                resolver=VettingResolver(lookup, allow_private=self._allow_private),
                use_dns_cache=False,  # every new connection resolves and checks again
                limit=self._max_connections,
                # No cap per receiver here: a wait for a pooled connection counts against the
                # attempt's deadline, so a busy receiver would time out its own queue. The
                # deliverer decides how many attempts one URL gets at once.
                limit_per_host=0,
                keepalive_timeout=15,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # nothing kept from one receiver for another
                trust_env=False,  # no proxy from HTTP(S)_PROXY: the guard checks the real target
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostResult:
        """POST ``body`` to ``url`` with ``headers`` (sent as given: the signed ones), once."""
        started = time.monotonic()
        try:
            target = URL(url)
            self._check(target)
        except Refused as exc:
            _log_refusal(_host_of(url), exc)
            return _ended(started, "ssrf_refused")
        except ValueError:
            return _ended(started, "invalid_url")
        try:
            async with asyncio.timeout(self._timeout):
                status, excerpt, retry_after = await self._send(target, body, headers)
        except Refused as exc:
            _log_refusal(target.raw_host or "", exc)
            return _ended(started, "ssrf_refused")
        except TimeoutError:  # asyncio's, and aiohttp's timeouts (subclasses of it)
            return _ended(started, "timeout")
        except aiohttp.ClientConnectorError as exc:
            return _ended(started, _connector_error(exc))
        except aiohttp.InvalidURL:
            return _ended(started, "invalid_url")
        except (aiohttp.ClientResponseError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
            return _ended(started, "protocol")
        except aiohttp.ClientSSLError:
            return _ended(started, "tls")
        except (aiohttp.ClientError, OSError):
            return _ended(started, "error")
        return _ended(started, _status_error(status), status, excerpt, retry_after)

    def _check(self, target: URL) -> None:
        """What the guard can say before any lookup (Refused), on the URL as aiohttp reads it."""
        scheme = target.scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused(ssrf.NotPublic("the scheme must be http or https"))
        host = target.raw_host
        if not host:
            raise ValueError("no host")
        if self._allow_private:
            return
        try:
            userinfo = target.raw_user is not None or target.raw_password is not None
            ssrf.vet_target(scheme, host, target.port, userinfo=userinfo)
        except ssrf.NotPublic as exc:
            raise Refused(exc) from None

    async def _send(
        self, target: URL, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str, float | None]:
        """The answer's status, body excerpt and Retry-After (on a 429 or 503)."""
        sent = {**headers, "Accept-Encoding": "identity"}
        async with self._client().post(target, data=body, headers=sent, allow_redirects=False) as resp:
            excerpt = await _read_excerpt(resp)
            retry_after = None
            if resp.status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(resp.headers, cap=MAX_RETRY_AFTER_SECONDS)
            return resp.status, excerpt, retry_after

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_excerpt(resp: aiohttp.ClientResponse) -> str:
    """Read at most MAX_READ_BYTES of the body (then drop the connection if more was coming)
    and keep the first MAX_KEPT_BYTES, decoded as UTF-8 with replacement characters."""
    kept = bytearray()
    remaining = MAX_READ_BYTES
    while remaining > 0:
        chunk = await resp.content.read(remaining)
        if not chunk:
            break
        remaining -= len(chunk)
        if len(kept) < MAX_KEPT_BYTES:
            kept += chunk[: MAX_KEPT_BYTES - len(kept)]
    if not resp.content.at_eof():
        resp.close()  # the rest is never read: the connection cannot be reused
    return bytes(kept).decode("utf-8", errors="replace")


def _ended(
    started: float,
    error: str | None,
    status: int | None = None,
    excerpt: str = "",
    retry_after: float | None = None,
) -> PostResult:
    latency_ms = int((time.monotonic() - started) * 1000)
    return PostResult(status, latency_ms, error, excerpt, retry_after)


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "redirect"
    return f"http_{status}"


def _log_refusal(host: str, exc: Refused) -> None:
    """For the operators: the host, and what it resolved to; never the URL's path or query."""
    cause = exc.cause
    if cause.address is not None:
        log.info("webhook refused at delivery: %s is %s (%s)", host, cause.address, cause.reason)
    else:
        log.info("webhook refused at delivery: %s", cause)


def _host_of(url: str) -> str:
    try:
        return URL(url).raw_host or ""
    except ValueError:
        return ""


def _connector_error(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientConnectorSSLError):
        return "tls"
    if isinstance(exc.os_error, socket.gaierror):
        return "dns"
    return "connect"
