"""The SSRF guard at submission (api/webhook_urls.py): a webhook_url that does not reach a
public address is refused with 422 and nothing is stored; PCQ_WEBHOOK_ALLOW_PRIVATE=true lets
it through. Names resolve from tests/fake_dns.py's table (the ``dns`` fixture), never over
DNS; no test connects anywhere."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.webhook_urls import RULE
from pcq.db import make_engine, make_session_factory
from pcq.models import Batch, Job
from pcq.tenants import create_key_at
from tests.conftest import make_settings
from tests.fake_dns import PUBLIC_ADDRESS, FakeDns

REQ = {"model": "lite", "messages": [{"role": "user", "content": "Who founded Parallel?"}]}

# Names of the fake DNS (``.test`` is reserved for testing: no real zone answers for it).
NAMES = {
    "loopback.example.test": ["127.0.0.1"],
    "loopback6.example.test": ["::1"],
    "private.example.test": ["10.0.0.5"],
    "metadata.example.test": ["169.254.169.254"],
    "mixed.example.test": [PUBLIC_ADDRESS, "10.0.0.1"],  # one bad address is enough
    "nat64-metadata.example.test": ["64:ff9b::a9fe:a9fe"],
    "nx.example.test": None,
}

REFUSED = [
    # literal addresses, in the spellings a URL parser turns into them
    "http://127.0.0.1/hook",
    "http://127.1:8080/hook",
    "http://2130706433/hook",
    "http://0x7f.1/hook",
    "http://017700000001/hook",
    "http://0/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:a9fe:a9fe]/hook",
    "http://[64:ff9b::7f00:1]/hook",
    "http://[2002:7f00:1::1]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://10.0.0.1/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://224.0.0.1/hook",
    "http://255.255.255.255/hook",
    "http://240.0.0.1/hook",
    "https://192.0.2.10/hook",
    "https://198.18.0.1/hook",
    # local names, refused before any lookup
    "http://localhost/hook",
    "http://LOCALHOST./hook",
    "http://api.localhost:8000/hook",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://printer.local/hook",
    "http://db:5432/hook",
    # names that resolve to a non-public address, or do not resolve
    *(f"https://{name}/hook" for name in NAMES),
    # the rest of the URL
    "https://user:secret@hooks.example.com/hook",
    "https://hooks.example.com:22/hook",
    "http://hooks.example.com:1023/hook",
]


@dataclass
class Api:
    client: TestClient
    key: str
    db_url: str

    def post_job(self, webhook_url: str) -> Any:
        body = {"request": REQ, "webhook_url": webhook_url}
        return self.client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {self.key}"})

    def post_batch(self, webhook_url: str) -> Any:
        # webhook_url after the requests: known only once they were read (and inserted)
        body = '{"requests": [{"custom_id": "a", "body": %s}], "webhook_url": "%s"}'
        return self.client.post(
            "/v1/batches",
            content=body % (json.dumps(REQ), webhook_url),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )

    def count(self, model: Any) -> int:
        engine = make_engine(self.db_url)
        with make_session_factory(engine)() as s:
            n = s.scalar(select(func.count()).select_from(model)) or 0
        engine.dispose()
        return n


@contextmanager
def running_api(db_url: str, **env: Any) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://", **env)
    with TestClient(create_app(settings)) as client:
        yield Api(client, create_key_at(db_url, "acme"), db_url)


@pytest.fixture
def api(sqlite_url: str, dns: FakeDns) -> Iterator[Api]:
    dns.table.update(NAMES)
    with running_api(sqlite_url) as api:
        yield api


@pytest.fixture
def open_api(sqlite_url: str, dns: FakeDns) -> Iterator[Api]:
    """The guard turned off: PCQ_WEBHOOK_ALLOW_PRIVATE=true."""
    dns.table.update(NAMES)
    with running_api(sqlite_url, PCQ_WEBHOOK_ALLOW_PRIVATE="true") as api:
        yield api


def assert_refused(r: Any) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "invalid_request"
    assert body["detail"].startswith("webhook_url: ")
    assert body["detail"].endswith(RULE)
    detail: str = body["detail"]
    return detail


@pytest.mark.parametrize("url", REFUSED)
def test_a_webhook_url_that_is_not_public_is_refused_and_nothing_is_stored(api: Api, url: str) -> None:
    assert_refused(api.post_job(url))
    assert api.count(Job) == 0


@pytest.mark.parametrize("name", list(NAMES))
def test_the_refusal_of_a_name_never_says_what_it_resolved_to(api: Api, name: str) -> None:
    detail = assert_refused(api.post_job(f"https://{name}/hook"))
    assert detail.startswith(f"webhook_url: {name!r} does not resolve to a public address")
    for address in ("127.0.0.1", "::1", "10.0.0", "169.254", "a9fe", PUBLIC_ADDRESS):
        assert address not in detail  # an internal name's addresses stay internal


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "https://loopback.example.test/hook",
        "http://169.254.169.254/latest/meta-data/",
        "https://nx.example.test/hook",
    ],
)
def test_a_json_batch_with_such_a_webhook_url_is_refused_whole(api: Api, url: str) -> None:
    assert_refused(api.post_batch(url))
    assert api.count(Batch) == 0
    assert api.count(Job) == 0


def test_a_name_resolving_to_loopback_is_refused_after_one_lookup(api: Api, dns: FakeDns) -> None:
    detail = assert_refused(api.post_job("https://loopback.example.test/hook"))
    assert detail.startswith("webhook_url: 'loopback.example.test' does not resolve to a public address")
    assert dns.asked == ["loopback.example.test"]


def test_local_names_and_literals_are_refused_without_a_lookup(api: Api, dns: FakeDns) -> None:
    for url in ("http://localhost/hook", "http://api.localhost/hook", "http://127.0.0.1/hook", "http://db/h"):
        assert_refused(api.post_job(url))
    assert dns.asked == []


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/pcq",  # resolves to a public address
        "https://hooks.example.com:8443/pcq",
        f"http://{PUBLIC_ADDRESS}/pcq",
        "https://[2606:4700:4700::1111]/pcq",
    ],
)
def test_a_public_webhook_url_is_accepted(api: Api, url: str) -> None:
    r = api.post_job(url)
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == url
    r = api.post_batch(url)
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == url


def test_a_resolver_in_trouble_lets_the_url_through_for_delivery_to_check(api: Api, dns: FakeDns) -> None:
    """EAI_AGAIN or no answer in time: the name may be fine; every delivery checks it again."""
    dns.table["flaky.example.test"] = socket.gaierror(
        socket.EAI_AGAIN, "Temporary failure in name resolution"
    )
    assert api.post_job("https://flaky.example.test/hook").status_code == 202

    release = threading.Event()
    dns.table["slow.example.test"] = lambda: ["127.0.0.1"] if release.wait(10) else []
    api.client.app.state.resources.submitter.webhook_urls.timeout = 0.2  # type: ignore[attr-defined]
    try:
        assert api.post_job("https://slow.example.test/hook").status_code == 202
    finally:
        release.set()
    assert api.count(Job) == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]:8080/hook",
        "http://localhost:8080/hook",
        "http://receiver/hook",
        "https://loopback.example.test/hook",
        "http://169.254.169.254/latest/meta-data/",
        "https://user:pw@hooks.example.com:22/hook",
        "https://nx.example.test/hook",
    ],
)
def test_allow_private_turns_the_guard_off(open_api: Api, dns: FakeDns, url: str) -> None:
    r = open_api.post_job(url)
    assert r.status_code == 202, r.text
    assert open_api.post_batch(url).status_code == 202
    assert open_api.count(Job) == 2
    assert dns.asked == []  # not even a lookup
