"""Every test of the API resolves names from a table (tests/fake_dns.py), never over DNS:
webhook URLs are resolved at submission (api/webhook_urls.py)."""

from __future__ import annotations

import socket

import pytest

from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import dispatch
from pcq.models import utcnow
from tests.fake_dns import FakeDns


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    """Any name resolves to a public address unless a test puts it in ``dns.table``."""
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


def take_waiting(sessions: SessionFactory) -> list[str]:
    """Every job waiting for the dispatcher, taken as it takes them (marked sent), by id: what
    the API queued since the last call (the API sends no message itself)."""
    with unit_of_work(sessions) as session:
        now = utcnow()
        groups = dispatch.backlog(session, now=now)
        return sorted(dispatch.take(session, [(g, g.waiting) for g in groups], now=now))
