"""The SSRF guard at submission: a ``webhook_url`` must be http(s) to a public address.

Refused with 422, nothing stored (pcq.ssrf has the rules): another scheme, a user name or
password, a port other than 80, 443 or 1024-65535, a literal address that is not public (in
any spelling: ``127.1``, ``2130706433``, ``[::ffff:127.0.0.1]``), a local name (``localhost``,
``*.localhost``, ``*.internal``, a single label), and a name that does not resolve, or
resolves to any address that is not public. Names are resolved with the system's resolver
(``getaddrinfo``: /etc/hosts, then DNS), in a small pool of threads, for at most
``RESOLVE_TIMEOUT_SECONDS``.

A lookup that times out or fails for a while (``EAI_AGAIN``: the resolver, not the name, is in
trouble) lets the URL through, with a warning: the client's input may be fine, and every
delivery resolves the name again and refuses a non-public address (worker/webhook_net.py),
so a URL stored here is never trusted. This check tells a client early; the delivery's is the
one that protects.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

from pcq import ssrf
from pcq.jobs.errors import InvalidInput

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 2.0
LOOKUP_THREADS = 4  # lookups at once; more wait their turn, within the same timeout
# The end of every refusal's detail (OpenAPI describes the rule: api.schemas.WEBHOOK_URL_RULE).
RULE = "a webhook must go to a public address over http(s)"
# getaddrinfo's answers for a name that does not exist or has no address (EAI_NODATA: Linux).
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


@dataclass
class WebhookUrlGuard:
    """Built once per API process (api.app.build_resources); ``allow_private`` is
    ``PCQ_WEBHOOK_ALLOW_PRIVATE``, which turns the whole check off."""

    allow_private: bool = False
    timeout: float = RESOLVE_TIMEOUT_SECONDS
    _lookups: ThreadPoolExecutor = field(
        default_factory=partial(ThreadPoolExecutor, LOOKUP_THREADS, "pcq-webhook-dns"), repr=False
    )

    def check(self, url: str | None) -> None:
        """Refuse ``url`` (as stored: api.schemas.check_webhook_url) unless it reaches only
        public addresses. Blocking (a lookup): call it from a thread, never the event loop."""
        if url is None or self.allow_private:
            return
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidInput(f"webhook_url: not a valid URL; {RULE}") from None
        host = parts.hostname or ""
        try:
            userinfo = parts.username is not None or parts.password is not None
            if ssrf.vet_target(parts.scheme, host, port, userinfo=userinfo) is None:
                self._resolve(host, port)
        except ssrf.NotPublic as exc:
            if exc.address is not None:
                log.info("webhook_url refused: %s is %s (%s)", host, exc.address, exc.reason)
            raise InvalidInput(f"webhook_url: {exc}; {RULE}") from None

    def _resolve(self, host: str, port: int | None) -> None:
        """NotPublic unless ``host`` resolves, now, to public addresses only."""
        lookup = self._lookups.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=self.timeout)
        except TimeoutError:
            lookup.cancel()
            log.warning("webhook_url %r: no answer from the resolver in %gs; accepted", host, self.timeout)
            return
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                raise ssrf.NotPublic(f"{host!r} does not resolve to a public address") from None
            log.warning("webhook_url %r: lookup failed (%s); accepted", host, exc)
            return
        except (OSError, UnicodeError):  # a name the resolver cannot even ask for (IDNA)
            raise ssrf.NotPublic(f"{host!r} is not a valid host name") from None
        ssrf.vet_addresses(host, (str(info[4][0]) for info in infos))

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
