"""Every test of the API resolves names from a table (tests/fake_dns.py), never over DNS:
webhook URLs are resolved at submission (api/webhook_urls.py)."""

from __future__ import annotations

import socket

import pytest

from tests.fake_dns import FakeDns


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    """Any name resolves to a public address unless a test puts it in ``dns.table``."""
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake
