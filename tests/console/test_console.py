"""The read-only console (api/routes/console.py).

First its pages through the app in-process (FastAPI's TestClient): sign-in, the cookie, the
tenant's scope, the headers that guard the key in the cookie, and escaping of whatever an
answer holds. Jobs are submitted through the API and their answers stored by the worker's own
writer (tests/core/lifecycle_helpers.py). Then the whole of it as a person uses it: a real
stack (PostgreSQL, Redis, API, worker, mock upstream) and Debian's headless Chromium driven by
Selenium; its screenshots are kept in test-artifacts/console/.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.jobs.lifecycle import AttemptRecord
from pcq.keys import mint_key
from pcq.models import utcnow
from pcq.tenants import create_key_at, list_keys, revoke_key
from pcq.wire import BasisData, CitationData, ParsedCompletion
from tests.conftest import _unavailable, make_settings
from tests.core import lifecycle_helpers as one
from tests.stack import Stack, stack_env

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
HOSTILE = "<script>alert('x')</script>"
COOKIE = "pcq_console"


def line(custom_id: str, text: str) -> str:
    body = {"model": "lite", "messages": [{"role": "user", "content": text}]}
    return json.dumps({"custom_id": custom_id, "body": body})


@dataclass
class Console:
    client: TestClient
    db_url: str
    key: str
    other_key: str
    batch_id: str
    jobs: list[str]  # the batch's, in submission order: [0] succeeded (hostile answer), [1] failed
    other_job: str  # globex's

    def sign_in(self, key: str | None = None) -> httpx.Response:
        return self.client.post("/console/login", data={"api_key": key or self.key}, follow_redirects=False)


def store(db_url: str, job_id: str, *, succeed: bool) -> None:
    """Run one attempt of the job through the worker's writer: an answer whose text and citation
    titles are hostile HTML, or a fatal 400."""
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    now = utcnow()
    with unit_of_work(sessions) as s:
        claimed = one.claim(s, job_id, now=now, lease_seconds=60, max_attempts=3)
        assert claimed is not None
        done = now + timedelta(milliseconds=1234)
        if succeed:
            cites = [
                CitationData(
                    url="https://Example.com/a", title=f"Title {HOSTILE}", excerpts=[f"ex {HOSTILE}"]
                ),
                CitationData(url="javascript:alert(1)", title="not a link", excerpts=None),
                CitationData(url="https://docs.example.org/b", title=None, excerpts=None),
            ]
            completion = ParsedCompletion(
                raw_body="{}",
                content=f"The answer {HOSTILE} & more",
                parsed=None,
                model="lite",
                finish_reason="stop",
                upstream_id="u1",
                usage={"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33},
                basis=[
                    BasisData("output", "because", "high", cites),
                    BasisData("other", None, "low", cites[:1]),
                ],
            )
            record = AttemptRecord(1, now, done, "ok", status_code=200)
            assert one.store_success(s, claimed, record, completion)
        else:
            record = AttemptRecord(1, now, done, "fatal", error_class="bad_request", status_code=400)
            one.store_failure(s, claimed, record, code="upstream_rejected", error="the upstream said 400")
    engine.dispose()


@pytest.fixture
def con(db_url: str) -> Iterator[Console]:
    """On SQLite and on PostgreSQL."""
    sqlite_url = db_url
    settings = make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as client:
        key, other = create_key_at(sqlite_url, "acme"), create_key_at(sqlite_url, "globex")
        r = client.post(
            "/v1/batches",
            content="\n".join(line(f"c{i}", f"q{i}") for i in range(3)),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        jobs = [
            j["id"]
            for j in client.get(
                "/v1/jobs", params={"batch_id": batch_id}, headers={"Authorization": f"Bearer {key}"}
            ).json()["data"]
        ]
        jobs.reverse()  # newest first -> submission order
        other_job = client.post(
            "/v1/jobs",
            json={"request": {"model": "lite", "messages": [{"role": "user", "content": "g"}]}},
            headers={"Authorization": f"Bearer {other}"},
        ).json()["id"]
        store(sqlite_url, jobs[0], succeed=True)
        store(sqlite_url, jobs[1], succeed=False)
        yield Console(client, sqlite_url, key, other, batch_id, jobs, other_job)


def test_the_console_without_a_cookie_shows_the_sign_in_form_and_pages_send_you_there(con: Console) -> None:
    r = con.client.get("/console")
    assert r.status_code == 200
    assert 'name="api_key"' in r.text
    assert 'type="password"' in r.text
    for path in ("/console/batches", f"/console/batches/{con.batch_id}", f"/console/jobs/{con.jobs[0]}"):
        r = con.client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/console", path


def test_sign_in_sets_an_http_only_strict_cookie_and_goes_to_the_batches(con: Console) -> None:
    r = con.sign_in()
    assert r.status_code == 303
    assert r.headers["location"] == "/console/batches"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path=/console", "samesite=strict"} <= flags
    # A session cookie: the browser keeps the key in memory only, never on disk.
    assert not any(f.startswith(("max-age", "expires")) for f in flags)
    assert "secure" not in flags  # plain http here; an https request gets Secure (below)
    assert con.key not in r.headers["location"]
    batches = con.client.get("/console/batches")
    assert batches.status_code == 200
    assert con.batch_id in batches.text
    assert con.client.get("/console", follow_redirects=False).headers["location"] == "/console/batches"


def test_over_https_the_cookie_is_secure(sqlite_url: str) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://")
    key = create_key_at(sqlite_url, "acme")
    with TestClient(create_app(settings), base_url="https://console.test") as client:
        r = client.post("/console/login", data={"api_key": key}, follow_redirects=False)
        assert r.status_code == 303
        assert "secure" in {p.strip().lower() for p in r.headers["set-cookie"].split(";")}


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "Enter your API key"),
        ("nope", "malformed API key"),
        ("pcq_000000000000_wrongwrongwrongwrongwrong", "malformed API key"),
        # Well formed, checksum and all, but no such key: never which part was wrong.
        (mint_key("").plaintext, "not valid, or it has been revoked"),
    ],
)
def test_a_bad_key_is_refused_with_a_clear_message_and_no_cookie(con: Console, key: str, says: str) -> None:
    r = con.client.post("/console/login", data={"api_key": key}, follow_redirects=False)
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert 'role="alert"' in r.text
    assert says in r.text
    assert con.client.get("/console/batches", follow_redirects=False).status_code == 303


def test_a_revoked_key_ends_the_session_at_the_next_page(con: Console) -> None:
    assert con.sign_in().status_code == 303
    assert con.client.get("/console/batches").status_code == 200
    engine = make_engine(con.db_url)
    with unit_of_work(make_session_factory(engine)) as s:
        mine = [k for k in list_keys(s) if k.tenant_name == "acme"]
        revoke_key(s, mine[0].id, utcnow())
    engine.dispose()
    r = con.client.get("/console/batches", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/console"
    assert f'{COOKIE}=""' in r.headers["set-cookie"]  # the cookie is cleared
    assert con.client.get(f"/console/batches/{con.batch_id}/events").status_code == 401


def test_sign_out_clears_the_cookie(con: Console) -> None:
    con.sign_in()
    r = con.client.post("/console/logout", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/console"
    assert "max-age=0" in r.headers["set-cookie"].lower()
    assert con.client.get("/console/batches", follow_redirects=False).status_code == 303


def test_a_form_posted_from_another_origin_is_refused(con: Console) -> None:
    r = con.client.post(
        "/console/login", data={"api_key": con.key}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    assert "set-cookie" not in r.headers


def test_behind_a_proxy_that_ends_tls_sign_in_works_and_the_cookie_is_secure(con: Console) -> None:
    """The proxy forwards plain http with its own Host; the browser's Origin is the public
    https one, which the proxy names in X-Forwarded-Host."""
    r = con.client.post(
        "/console/login",
        data={"api_key": con.key},
        headers={
            "Origin": "https://console.example.com",
            "X-Forwarded-Host": "console.example.com",
            "X-Forwarded-Proto": "https",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert "secure" in {p.strip().lower() for p in r.headers["set-cookie"].split(";")}


@pytest.mark.parametrize("body", ["api_key=x&&&&&", "a=1&b=2&c=3&d=4&e=5&api_key=x"])
def test_a_sign_in_form_with_more_fields_than_it_has_is_a_400_never_a_5xx(con: Console, body: str) -> None:
    r = con.client.post(
        "/console/login",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert r.status_code == 400
    assert "set-cookie" not in r.headers


def test_another_tenants_batch_or_job_and_garbage_ids_are_404_pages(con: Console) -> None:
    con.sign_in(con.other_key)  # globex
    for path in (
        f"/console/batches/{con.batch_id}",
        f"/console/jobs/{con.jobs[0]}",
        f"/console/batches/{con.batch_id}/events",
        "/console/batches/nope",
        "/console/jobs/job_" + "f" * 300,
        "/console/jobs/%E2%98%83%20%27%22",
        "/console/static/%2E%2E%2Fapp.py",
        "/console/static/nothing.js",
    ):
        r = con.client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "text/html" in r.headers["content-type"], path
    assert con.client.get(f"/console/jobs/{con.other_job}").status_code == 200  # its own


@pytest.mark.parametrize("cursor", ["%%%", "bm90IGFuIGlk", "x" * 5000])
def test_a_garbage_cursor_is_never_a_server_error(con: Console, cursor: str) -> None:
    con.sign_in()
    for path in (
        "/console/batches",
        f"/console/batches/{con.batch_id}",
        "/console/citations?domain=example.com&",
    ):
        r = con.client.get(path, params={"cursor": cursor})
        assert r.status_code in (200, 422), (path, r.status_code)


def test_pages_are_not_cached_and_allow_no_inline_script(con: Console) -> None:
    con.sign_in()
    for path in (
        "/console",
        "/console/batches",
        f"/console/batches/{con.batch_id}",
        f"/console/jobs/{con.jobs[0]}",
        "/console/citations",
        "/console/jobs/nope",
    ):
        r = con.client.get(path, follow_redirects=False)
        assert r.headers["cache-control"] == "no-store", path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
        assert con.key not in r.text


def test_the_batch_page_shows_counts_a_progress_bar_and_its_jobs(con: Console) -> None:
    con.sign_in()
    r = con.client.get(f"/console/batches/{con.batch_id}")
    assert r.status_code == 200
    assert re.search(r'<progress[^>]*value="2" max="3"', r.text)
    assert re.search(r'data-count="succeeded">1<', r.text)
    assert re.search(r'data-count="failed">1<', r.text)
    assert re.search(r'data-count="queued">1<', r.text)
    assert f'data-events="/console/batches/{con.batch_id}/events"' in r.text
    for job_id in con.jobs:
        assert f'href="/console/jobs/{job_id}"' in r.text
    assert "upstream_rejected" in r.text
    listing = con.client.get("/console/batches").text
    assert re.search(r'<progress[^>]*value="2" max="3"', listing)


def test_the_job_page_shows_answer_usage_attempts_and_citations_escaped(con: Console) -> None:
    con.sign_in()
    r = con.client.get(f"/console/jobs/{con.jobs[0]}")
    assert r.status_code == 200
    html = r.text
    assert "<script>alert" not in html  # only the page's own script tags, and no inline one
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "The answer &lt;script&gt;" in html
    assert "&amp; more" in html
    for tokens in ("11", "22", "33"):
        assert f"<dd>{tokens}</dd>" in html
    assert re.search(r"<td class=\"num\">1</td>\s*<td><span class=\"pill ok\">ok</span>", html)
    assert "1234 ms" in html
    assert ">200<" in html
    assert 'href="https://Example.com/a"' in html
    assert 'href="https://docs.example.org/b"' in html
    assert 'href="javascript:' not in html  # shown as text, never a link
    assert "javascript:alert(1)" in html
    assert html.count("<code>output</code>") == 3
    assert html.count("<code>other</code>") == 1
    failed = con.client.get(f"/console/jobs/{con.jobs[1]}").text
    assert "bad_request" in failed
    assert ">400<" in failed
    assert "the upstream said 400" in failed


def domain_rows(html: str) -> list[tuple[str, int, int]]:
    rows = re.findall(
        r'domain=([^"]+)">([^<]+)</a></td>\s*<td class="num">(\d+)</td>\s*<td class="num">(\d+)', html
    )
    return [(name, int(c), int(j)) for _, name, c, j in rows]


def test_citations_by_domain_count_the_tenants_citations_and_open_a_domains_rows(con: Console) -> None:
    """A batch's citations are counted from its batch_domains rows, a lone job's from its
    citation rows: both show, each tenant its own."""
    store(con.db_url, con.other_job, succeed=True)  # globex's job, in no batch
    for key in (con.key, con.other_key):
        con.sign_in(key)
        html = con.client.get("/console/citations").text
        assert domain_rows(html) == [("example.com", 2, 1), ("docs.example.org", 1, 1)]
        assert "(no host)" in html  # the javascript: URL
    con.sign_in()
    one_domain = con.client.get("/console/citations", params={"domain": "example.com"})
    assert one_domain.status_code == 200
    assert one_domain.text.count(f'href="/console/jobs/{con.jobs[0]}"') == 2
    assert con.other_job not in one_domain.text
    assert "&lt;script&gt;" in one_domain.text
    assert "<script>alert" not in one_domain.text


def test_the_console_is_not_in_the_openapi_document(con: Console) -> None:
    paths = con.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/console")]


# --- in a real browser, on the real stack

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
JOBS = 20


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver (CI installs them; .ci/run); skipped without them
    unless CI=true."""
    browser = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None)
    if browser is None or driver is None:
        _unavailable(
            "headless Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    assert browser is not None
    assert driver is not None
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # we run as root in CI
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """The whole page (up to 4,000 CSS pixels down), not only the window, as a PNG artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    assert len(data) > 10_000, (path, len(data))  # a rendered page, not a blank one


@pytest.mark.e2e
def test_a_person_signs_in_watches_a_batch_finish_and_reads_a_jobs_citations(
    pg_url: str, redis_url: str, tmp_path: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Stack(stack_env(pg_url, redis_url), tmp_path)
    try:
        s.start_mock()
        s.start_api()
        s.start_worker()
        key = create_key_at(pg_url, f"console-{uuid.uuid4().hex[:6]}")
        wait = WebDriverWait(browser, 60, poll_frequency=0.1)

        browser.get(f"{s.api_url}/console")
        field = browser.find_element(By.ID, "api_key")
        field.send_keys(key)
        field.submit()
        wait.until(lambda d: d.current_url.endswith("/console/batches"))
        assert key not in browser.current_url
        cookie = browser.get_cookie(COOKIE)
        assert cookie is not None
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/console"

        # Jobs that answer one after another over ~8 s, so that the page has progress to show.
        lines = [
            line(f"c{i:02d}", f"q{i} {uuid.uuid4().hex} [[mock:latency_ms={1000 + 350 * i}]]")
            for i in range(JOBS)
        ]
        r = httpx.post(
            f"{s.api_url}/v1/batches",
            content="\n".join(lines) + "\n",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]

        browser.refresh()
        browser.find_element(By.LINK_TEXT, batch_id).click()
        wait.until(lambda d: d.current_url.endswith(f"/console/batches/{batch_id}"))
        box = browser.find_element(By.ID, "progress")
        bar = box.find_element(By.CSS_SELECTOR, "progress")
        at_load = int(bar.get_attribute("value"))
        assert at_load < JOBS, "the batch ended before its page loaded: nothing to see move"
        browser.execute_script("window.__sameDocument = true")  # gone if the page reloads
        wait.until(lambda d: 0 < int(bar.get_attribute("value")) < JOBS)  # moving, live
        screenshot(browser, "batch-running.png")

        wait.until(lambda d: box.get_attribute("data-completed") == "true")
        assert browser.execute_script("return window.__sameDocument === true"), "the page reloaded"
        assert int(bar.get_attribute("value")) == JOBS
        assert box.find_element(By.CSS_SELECTOR, '[data-role="status"]').text == "completed"
        assert box.find_element(By.CSS_SELECTOR, '[data-count="succeeded"]').text == str(JOBS)
        assert box.find_element(By.CSS_SELECTOR, '[data-role="ended"]').text == str(JOBS)
        # It moved while watched: more than one event, the first of them short of the end.
        assert int(box.get_attribute("data-events-seen")) >= 2
        assert int(box.get_attribute("data-first-seen")) < JOBS
        browser.refresh()  # the jobs' own statuses, as they are now
        batch_png = screenshot(browser, "batch.png")

        browser.find_element(By.LINK_TEXT, browser.find_elements(By.CSS_SELECTOR, "a.id")[0].text).click()
        wait.until(lambda d: "/console/jobs/" in d.current_url)
        assert browser.find_element(By.CSS_SELECTOR, '[data-role="answer"]').text.strip()
        attempts = browser.find_elements(By.CSS_SELECTOR, '[data-role="attempts"] tbody tr')
        assert len(attempts) == 1
        assert "ok" in attempts[0].text
        assert "200" in attempts[0].text
        cites = browser.find_elements(By.CSS_SELECTOR, '[data-role="citations"] tbody tr')
        assert cites, "the job's citations are not shown"
        links = browser.find_elements(By.CSS_SELECTOR, '[data-role="citations"] .title a')
        assert links
        assert all(a.get_attribute("href").startswith(("http://", "https://")) for a in links)
        job_png = screenshot(browser, "job.png")

        browser.find_element(By.LINK_TEXT, "Citations").click()
        wait.until(lambda d: d.current_url.endswith("/console/citations"))
        domains = browser.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
        assert domains
        citations_png = screenshot(browser, "citations.png")

        for png in (batch_png, job_png, citations_png, ARTIFACTS / "batch-running.png"):
            assert_png(png)
        assert key not in s.logs()  # nor in any process's log
    finally:
        s.stop_all()


def test_the_consoles_event_stream_is_the_batchs_and_counts_against_the_tenants_streams(
    con: Console,
) -> None:
    from api.deps import tenant_of_key

    con.sign_in()
    con.client.post(f"/v1/jobs/{con.jobs[2]}/cancel", headers={"Authorization": f"Bearer {con.key}"})
    r = con.client.get(f"/console/batches/{con.batch_id}/events")  # the batch has ended: one event
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    event = dict(part.split(": ", 1) for part in r.text.strip().splitlines())
    assert event["event"] == "batch.completed"
    assert json.loads(event["data"])["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 1,
    }
    seen = con.client.get(f"/console/batches/{con.batch_id}/events", headers={"Last-Event-ID": event["id"]})
    assert seen.status_code == 204  # nothing newer: an EventSource stops reconnecting
    res = con.client.app.state.resources  # type: ignore[attr-defined]
    tenant = tenant_of_key(res, con.key)
    assert tenant is not None
    held = [res.event_streams.take(tenant) for _ in range(res.settings.sse_max_streams_per_tenant)]
    try:
        full = con.client.get(f"/console/batches/{con.batch_id}/events")
        assert full.status_code == 429
        assert "Retry-After" in full.headers
        assert "text/html" in full.headers["content-type"]
    finally:
        for release in held:
            release()
