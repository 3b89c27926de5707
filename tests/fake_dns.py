"""A stand-in for ``socket.getaddrinfo``: names resolve from a table, never over DNS.

Tests send traffic only to 127.0.0.1 and ::1, and a DNS query is traffic. Installed with
monkeypatch (``socket.getaddrinfo`` is read at call time by the API's guard and by asyncio's
``loop.getaddrinfo``), numeric hosts still go to the real function (no lookup: the C library
reads them, ``AI_NUMERICHOST``), and any other name answers from ``table``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

# What a name outside the table resolves to: public, and never connected to by any test.
PUBLIC_ADDRESS = "93.184.215.14"

# An answer: the addresses, None for a name that does not exist, an exception to raise, or a
# function called at lookup time (to block, or to answer differently each time).
Answer = Sequence[str] | BaseException | Callable[[], Sequence[str]] | None

_REAL_GETADDRINFO = socket.getaddrinfo


class FakeDns:
    def __init__(self, table: dict[str, Answer] | None = None, default: Answer = (PUBLIC_ADDRESS,)) -> None:
        self.table: dict[str, Answer] = {"localhost": ["127.0.0.1", "::1"], **(table or {})}
        self.default = default
        self.asked: list[str] = []  # every name looked up, in order (numeric hosts are not)

    def __call__(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None:
            return _REAL_GETADDRINFO(host, port, family, type, proto, flags)
        try:
            return _REAL_GETADDRINFO(name, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        key = name.lower().rstrip(".")
        self.asked.append(key)
        answer = self.table.get(key, self.default)
        if callable(answer):
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        number = int(port or 0)
        infos: list[tuple[Any, ...]] = []
        for text in answer:
            v6 = ipaddress.ip_address(text).version == 6
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            if family in (0, fam):
                sockaddr = (text, number, 0, 0) if v6 else (text, number)
                infos.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos
