"""No secret leaks: a run that takes every error path, then a search of everything it left.

Planted, each a distinctive random string: two upstream keys (``PCQ_UPSTREAM_KEYS``; the mock
upstream accepts only one, so calls on the other are answered 401), two tenants' API keys
(``pcq keys create``), a mistyped copy of one and a wrong one (well-formed, with its checksum, and
tenant A's prefix, but not its secret), the tenants' webhook signing secrets (one
rotated, so two sign), the database password (a role of our own in ``DATABASE_URL``), and a
webhook URL with a password and a token in it.

The run: jobs that meet 401, 429 with Retry-After, 500/503, 403, read timeouts, a malformed
answer and a 401 that quotes the key it was sent (whole and its start); webhooks to a receiver
that always answers 500 and to one that works; a PostgreSQL restart while calls are in flight;
bad API requests (no key, a mistyped key, a malformed one, bad JSON, another tenant's job, a
bad page size); every read a client makes (jobs, batches, results, events, domains, citations,
deliveries, a redelivery) and ``pcq export`` / ``pcq keys list`` / ``pcq keys upstream``; the
console as each tenant sees it (sign-in, then every page: batches, a batch, each job, citations,
a domain's citations, another tenant's job, a few lines of a batch's event stream) and its
sign-in refusing the mistyped and the wrong key; at the end, the API's ``/metrics`` and the
worker's metrics endpoint.

Searched for each secret, whole and as any 10-character piece of its random part: every line
of every process's log (the mock upstream's own log is searched for all but the upstream
keys, which it receives by design), every value of every table, every Redis command the run
sent (``MONITOR``, with base64 payloads decoded: Celery's message bodies are base64), every
API response's status line, headers and body (the console's pages too), both metrics scrapes,
and the output of the ``pcq`` client commands.

What holds secrets by design, and is left out: ``webhook_secrets.secret`` (kept in clear,
because signing needs the key itself) and the two responses that hand a signing secret to its
tenant (``/v1/webhooks/secret`` and its rotation), and the ``Set-Cookie`` header of a console
sign-in that succeeded: the cookie is the key (api.routes.console). The webhook URL is stored
and shown back to its tenant as given, so its password and token may be in the tables and the
API's answers, but never in a log or a broker message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pcq.keys import checksum
from pcq.models.job import TERMINAL_STATUSES
from shell.procs import free_port, wait_http
from tests.faults.helpers import (
    Db,
    PrivatePostgres,
    PrivateRedis,
    fault_env,
    wait_for,
    wait_worker_ready,
)
from tests.stack import Stack
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.realservices]

PIECE = 10  # characters of a secret's random part that, found anywhere, count as a leak
MOCK_KEYS_VAR = "MOCK_UPSTREAM_KEYS"  # not PCQ_*: pcq refuses unknown PCQ_ variables


def rand(n: int = 24) -> str:
    """Letters and digits only, so no encoding (JSON, URL, log escaping) can change it."""
    return secrets.token_hex(n // 2)


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    random_part: str  # the part no one may see a piece of (a key's public prefix is not in it)
    in_stored: bool = False  # by design in the tables and its tenant's API answers (the URL's)

    def needles(self) -> list[str]:
        core = self.random_part
        return [self.value, *(core[i : i + PIECE] for i in range(len(core) - PIECE + 1))]


@dataclass
class Haystacks:
    """Named texts searched for the secrets, by kind."""

    logs: dict[str, str] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    broker: dict[str, str] = field(default_factory=dict)
    responses: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    cli: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ capture


class Monitor:
    """``MONITOR`` on the test's own redis-server, raw, for the run: every command every
    process sends (Lua scripts' own calls included), with all its arguments."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.sock.settimeout(None)
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self._recv():
            self.data += chunk

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 16)
        except OSError:
            return b""

    def stop(self) -> str:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()
        return self.data.decode(errors="replace")


CONSOLE_LOGIN = "/console/login"


class Recorder:
    """Every response the test's HTTP clients get: request line, status, headers and body.

    The one header that holds a key by design, the cookie a console sign-in sets when it
    succeeds (a 303), is kept apart, in ``cookies_set``; a refused sign-in's headers are
    searched like any others."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (request path, everything the client got)
        self.cookies_set: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.add(response, response.text)

    def add(self, response: httpx.Response, body: str) -> None:
        """``response`` with ``body``: what was read of it (a stream is read only in part)."""
        headers = response.headers.multi_items()
        if response.request.url.path == CONSOLE_LOGIN and response.status_code == 303:
            self.cookies_set += [v for k, v in headers if k == "set-cookie"]
            headers = [(k, v) for k, v in headers if k != "set-cookie"]
        head = "\n".join(f"{k}: {v}" for k, v in headers)
        text = f"{response.status_code} {response.reason_phrase}\n{head}\n\n{body}"
        self.seen.append((response.request.url.path, text))


_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=_-]{16,}")


def with_base64_decoded(text: str) -> str:
    """``text`` followed by the decoding of every base64 run in it (and of runs in those)."""
    out = [text]
    todo = [text.encode()]
    for _ in range(3):  # a body in a body: Celery's message, then anything encoded inside it
        found: list[bytes] = []
        for blob in todo:
            for run in _BASE64_RUN.findall(blob):
                for decode in (base64.b64decode, base64.urlsafe_b64decode):
                    try:
                        decoded = decode(run + b"=" * (-len(run) % 4))
                    except (binascii.Error, ValueError):
                        continue
                    found.append(decoded)
        out += [b.decode(errors="replace") for b in found]
        todo = found
    return "\n".join(out)


# ---------------------------------------------------------------------------- the stack


def pcq(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``pcq <args>`` as a user runs it (this interpreter, this checkout's code)."""
    return subprocess.run(
        [sys.executable, "-m", "shell.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def admin_dsn(pg: PrivatePostgres) -> str:
    return f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"


def database_with_password(pg: PrivatePostgres, password: str) -> str:
    """A login role of our own with ``password``, and a DATABASE_URL that carries it. The
    cluster trusts 127.0.0.1 and never checks it: what matters is that every process has it in
    its DATABASE_URL. (The cluster is the test's own and is removed with the role.)"""
    with psycopg.connect(admin_dsn(pg), autocommit=True) as c:
        c.execute(f"CREATE ROLE pcq_leaks LOGIN SUPERUSER PASSWORD '{password}'")
    return f"postgresql://pcq_leaks:{password}@127.0.0.1:{pg.port}/postgres"


def dump_tables(pg: PrivatePostgres) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of the database, as text values by column."""
    with psycopg.connect(admin_dsn(pg)) as c:
        tables = [
            r[0]
            for r in c.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                "AND table_type = 'BASE TABLE' ORDER BY table_name"
            )
        ]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in tables:
            cur = c.execute(f'SELECT * FROM "{table}"')  # noqa: S608  (names from the catalog)
            names = [d.name for d in cur.description or []]
            out[table] = [dict(zip(names, row, strict=True)) for row in cur]
    return out


def chat(content: str) -> dict[str, Any]:
    return {"model": "lite", "messages": [{"role": "user", "content": content}]}


def wrong_key(key: str) -> str:
    """A key that passes every check but the secret's: the shape, a checksum that matches, and
    ``key``'s prefix, so its row is found and only the hash comparison refuses it."""
    scheme, prefix, _ = key.split("_", 2)
    body = f"{scheme}_{prefix}_{rand(32)}"
    return body + checksum(body)


_DOMAIN_LINK = re.compile(r'href="(/console/citations\?domain=[^"]+)"')


def browse_console(
    url: str, key: str, recorder: Recorder, batches: list[str], jobs: list[str], foreign_job: str
) -> dict[str, str]:
    """Sign in to the console with ``key`` and open every page a person can reach: the batch
    list, each batch, each of ``jobs``, the citations and a domain's, a few lines of each
    batch's event stream, and ``foreign_job`` (another tenant's: a 404 page). Every page
    answered 200 (the foreign job 404) with the id it is about; returns each page's body."""
    with httpx.Client(base_url=url, timeout=30, event_hooks={"response": [recorder]}) as c:
        r = c.post(CONSOLE_LOGIN, data={"api_key": key})
        assert r.status_code == 303, (r.status_code, r.text)
        assert c.cookies.get("pcq_console")
        assert c.get("/console").status_code == 303  # signed in: on to the batches
        pages = {"/console/batches": "Batches", "/console/citations": "Citations"}
        pages |= {f"/console/batches/{b}": b for b in batches}
        pages |= {f"/console/jobs/{j}": j for j in jobs}
        shown: dict[str, str] = {}
        for path, expected in pages.items():
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:2000])
            assert expected in r.text, (path, r.text[:2000])
            shown[path] = r.text
        domains = _DOMAIN_LINK.findall(shown["/console/citations"])
        assert domains, shown["/console/citations"][:3000]
        r = c.get(domains[0].replace("&amp;", "&"))
        assert r.status_code == 200, (domains[0], r.text[:2000])
        r = c.get(f"/console/jobs/{foreign_job}")
        assert r.status_code == 404, (foreign_job, r.status_code)
        for batch in batches:
            shown[f"/console/batches/{batch}/events"] = read_events(
                c, f"/console/batches/{batch}/events", recorder
            )
    return shown


def read_events(signed_in: httpx.Client, path: str, recorder: Recorder) -> str:
    """The first lines of a console event stream (at most 20, for at most 10 s), recorded as
    read. Read from a client of its own with the same cookie: the recorder's hook reads a body
    to its end, and a stream may not end."""
    lines: list[str] = []
    deadline = time.monotonic() + 10
    with httpx.Client(
        base_url=str(signed_in.base_url), cookies=signed_in.cookies, timeout=httpx.Timeout(10, read=3)
    ) as c:
        with c.stream("GET", path) as r:
            try:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) >= 20 or time.monotonic() > deadline:
                        break
            except httpx.ReadTimeout:
                pass
            recorder.add(r, "\n".join(lines))
    assert r.status_code == 200, (path, r.status_code, lines)
    assert any(line.startswith("data:") for line in lines), (path, lines)
    return "\n".join(lines)


# The upstream's answers each job asks for (mock directives), by the path it should take.
CONTENTS = {
    "ok": ["all well {i}"] * 4,
    "429": ["[[mock:status=429,retry_after=1,times=1]] slow down {i}"] * 3,
    "500": ["[[mock:status=500,times=1]] server trouble {i}"] * 3,
    "503": ["[[mock:status=503]] always down {i}"] * 3,
    "403": ["[[mock:status=403]] forbidden {i}"] * 3,
    "timeout": ["[[mock:latency_ms=2500,times=1]] silent too long {i}"] * 3,
    "malformed": ["[[mock:malformed,times=1]] a broken answer {i}"] * 2,
    "echo": ["[[mock:echo_key]] an upstream that repeats the key {i}"] * 2,
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_no_secret_in_any_log_stored_text_broker_message_or_response_after_every_error_path(
    tmp_path: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis, log_level: str
) -> None:
    good_key, bad_key = f"UPgood{rand(32)}", f"UPbad{rand(32)}"
    db_password = f"DBpw{rand(24)}"
    hook_password, hook_token = f"HOOKpw{rand(20)}", f"HOOKtok{rand(20)}"
    database_url = database_with_password(private_pg, db_password)
    metrics_port = free_port()

    env = fault_env(
        database_url,
        private_redis.url,
        # The bad key first, with one call a second: ties go to it, then most calls to the good one.
        PCQ_UPSTREAM_KEYS=json.dumps(
            [{"key": bad_key, "rate_limit_per_minute": 60, "rate_limit_burst": 0}, {"key": good_key}]
        ),
        PCQ_READ_TIMEOUT_SECONDS="1",
        PCQ_TOTAL_TIMEOUT_SECONDS="4",
        PCQ_MAX_ATTEMPTS="4",
        PCQ_WEBHOOK_ALLOW_PRIVATE="true",
        PCQ_WEBHOOK_RETRY_SCHEDULE="0.3,0.6",
        PCQ_WEBHOOK_TIMEOUT_SECONDS="2",
        PCQ_LOG_LEVEL=log_level,
        PCQ_METRICS_PORT=str(metrics_port),
        PCQ_METRICS_HOST="127.0.0.1",
    )
    env.pop("PARALLEL_API_KEY")
    env[MOCK_KEYS_VAR] = good_key

    receiver = Receiver()
    stack = Stack(env, tmp_path)
    monitor = Monitor(private_redis.port)
    recorder = Recorder()
    client = httpx.Client(timeout=30, event_hooks={"response": [recorder]})
    cli: dict[str, str] = {}
    metrics: dict[str, str] = {}
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        stack.start_mock("--api-keys-env", MOCK_KEYS_VAR)
        stack.start_api()
        wait_http(worker_metrics, proc=stack.start_worker())
        wait_worker_ready(stack)

        # Tenant keys, minted as users mint them.
        created = {
            name: pcq(env, "keys", "create", "--tenant", name).stdout for name in ("leaks-a", "leaks-b")
        }
        key_a, key_b = (created[name].strip().splitlines()[-1] for name in ("leaks-a", "leaks-b"))
        mistyped = key_a[:-1] + ("x" if key_a[-1] != "x" else "y")
        wrong = wrong_key(key_a)
        a, b = {"Authorization": f"Bearer {key_a}"}, {"x-api-key": key_b}
        url = stack.api_url

        # Webhook signing secrets: A's current one, then rotated (both sign now), B's.
        whsec_a1 = client.get(f"{url}/v1/webhooks/secret", headers=a).json()["secret"]
        whsec_a2 = client.post(f"{url}/v1/webhooks/secret/rotate", headers=a).json()["secret"]
        whsec_b = client.get(f"{url}/v1/webhooks/secret", headers=b).json()["secret"]

        failing_path = f"/fail?token={hook_token}"
        receiver.script[failing_path] = [500] * 10_000
        failing_hook = f"http://hookuser:{hook_password}@127.0.0.1:{receiver.port}{failing_path}"
        working_hook = receiver.url("/ok")

        # A's batch: every upstream error path; every job event goes to the failing receiver.
        requests = [
            {"custom_id": f"{kind}-{i}", "body": chat(text.format(i=i))}
            for kind, texts in CONTENTS.items()
            for i, text in enumerate(texts)
        ]
        r = client.post(
            f"{url}/v1/batches",
            json={
                "requests": requests,
                "webhook_url": failing_hook,
                "webhook_events": ["job.succeeded", "job.failed"],
            },
            headers=a,
        )
        assert r.status_code == 202, r.text
        batches = [r.json()["id"]]
        # B's jobs go to the working receiver.
        job_ids = []
        for i in range(3):
            r = client.post(
                f"{url}/v1/jobs",
                json={"request": chat(f"tenant b {i}"), "webhook_url": working_hook},
                headers=b,
            )
            assert r.status_code == 202, r.text
            job_ids.append(r.json()["id"])

        # PostgreSQL restarts while calls are in flight (the timeouts hold theirs for 1 s+).
        wait_for("calls in flight", lambda: stack.mock_stats()["in_flight"] > 0, timeout=15, interval=0.05)
        private_pg.restart()

        def submit_after() -> str | None:
            try:
                r = client.post(
                    f"{url}/v1/batches",
                    json={"requests": [{"custom_id": "after", "body": chat("after the restart")}]},
                    headers=a,
                )
            except httpx.HTTPError:
                return None
            return str(r.json()["id"]) if r.status_code == 202 else None

        batches.append(wait_for("the API to accept a batch again", submit_after, timeout=20, interval=0.5))

        # Bad requests: no key, a mistyped key (both headers), a malformed one, bad JSON, a bad
        # page size, a bad webhook URL, another tenant's job, a cancel of an ended job.
        client.get(f"{url}/v1/jobs")
        client.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {mistyped}"})
        client.get(f"{url}/v1/jobs", headers={"x-api-key": mistyped})
        client.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {wrong}"})
        client.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key_b[:20]}"})
        client.get(f"{url}/v1/jobs", headers={"Authorization": f"Basic {key_a}"})
        client.post(
            f"{url}/v1/jobs", content=b'{"request": ', headers={**a, "Content-Type": "application/json"}
        )
        client.post(f"{url}/v1/jobs", json={"request": chat("x"), "webhook_url": "ftp://x/"}, headers=a)
        client.get(f"{url}/v1/jobs", params={"limit": 5000}, headers=a)
        client.get(f"{url}/v1/jobs/{job_ids[0]}", headers=a)

        # Every job ends, and every webhook event is delivered or has failed for good.
        db = Db(private_pg.url)
        try:
            a_ids = [i for batch in batches for i in db.batch_job_ids(batch)]
            all_ids = a_ids + job_ids

            def ended() -> bool:
                jobs = db.try_jobs(all_ids)
                return jobs is not None and all(j.status in TERMINAL_STATUSES for j in jobs.values())

            wait_for("every job to end", ended, timeout=45, interval=0.3)

            def delivered() -> bool:
                with db.engine.connect() as c:
                    pending = c.exec_driver_sql(
                        "SELECT count(*) FROM webhook_events WHERE status = 'pending'"
                    )
                    return pending.scalar_one() == 0

            wait_for("every webhook event to settle", delivered, timeout=20, interval=0.3)
        finally:
            db.close()
        client.post(f"{url}/v1/jobs/{job_ids[0]}/cancel", headers=b)  # 409: it has ended

        # Every read a client makes.
        for batch in batches:
            client.get(f"{url}/v1/batches/{batch}", headers=a)
            client.get(f"{url}/v1/batches/{batch}/results", headers=a)
            client.get(f"{url}/v1/batches/{batch}/events", headers=a)
            client.get(f"{url}/v1/batches/{batch}/domains", headers=a)
            for job in client.get(f"{url}/v1/jobs", params={"batch_id": batch}, headers=a).json()["data"]:
                client.get(f"{url}/v1/jobs/{job['id']}", headers=a)
        for job_id in job_ids:
            client.get(f"{url}/v1/jobs/{job_id}", headers=b)
        client.get(f"{url}/v1/citations", headers=a)
        client.get(f"{url}/v1/citations", headers=b)
        failed = client.get(f"{url}/v1/webhooks/deliveries", params={"status": "failed"}, headers=a)
        client.get(f"{url}/v1/webhooks/deliveries", headers=b)
        client.post(f"{url}/v1/webhooks/deliveries/{failed.json()['data'][0]['id']}/redeliver", headers=a)
        client.get(f"{url}/healthz")
        client.get(f"{url}/readyz")
        client.get(f"{url}/v1/no-such-route", headers=a)

        # The console, as each tenant sees it; its sign-in refusing a mistyped and a wrong key,
        # and a cookie that holds a wrong key (a page: back to sign-in; the stream: a 401).
        console_a = browse_console(url, key_a, recorder, batches, a_ids, foreign_job=job_ids[0])
        browse_console(url, key_b, recorder, [], job_ids, foreign_job=a_ids[0])
        echo_pages = [t for p, t in console_a.items() if "/jobs/" in p and "echo-" in t]
        assert echo_pages
        assert all("failed" in t and "401" in t for t in echo_pages), echo_pages
        assert any("[redacted]" in t for t in echo_pages), echo_pages  # the 401 that named the key
        assert any("succeeded" in t for p, t in console_a.items() if "/jobs/" in p)
        refusals = {mistyped: "(a typo?)", wrong: "That key is not valid, or it has been revoked."}
        for bad, why in refusals.items():
            r = client.post(f"{url}{CONSOLE_LOGIN}", data={"api_key": bad})
            assert r.status_code == 401, (r.status_code, r.text)
            assert why in r.text, r.text
        stale = {"Cookie": f"pcq_console={wrong}"}
        assert client.get(f"{url}/console/batches", headers=stale).status_code == 303
        assert client.get(f"{url}/console/batches/{batches[0]}/events", headers=stale).status_code == 401

        # The client commands: an export, one with a mistyped key, the key list.
        client_env = {**env, "PCQ_API_URL": url, "PCQ_API_KEY": key_a}
        out = pcq(client_env, "export", batches[0], "--format", "csv", "-o", str(tmp_path / "out.csv"))
        cli["pcq export"] = out.stdout + out.stderr + (tmp_path / "out.csv").read_text()
        out = pcq({**client_env, "PCQ_API_KEY": mistyped}, "export", batches[0], check=False)
        assert out.returncode != 0
        cli["pcq export (mistyped key)"] = out.stdout + out.stderr
        out = pcq(env, "keys", "list")
        cli["pcq keys list"] = out.stdout + out.stderr
        out = pcq(env, "keys", "upstream")
        cli["pcq keys upstream"] = out.stdout + out.stderr
        time.sleep(1)  # the redelivery's attempt, into the logs and the tables

        metrics["API /metrics"] = httpx.get(f"{url}/metrics", timeout=10).text
        metrics["worker metrics"] = httpx.get(worker_metrics, timeout=10).text
    finally:
        client.close()
        stack.stop_all()
        broker = monitor.stop()
        receiver.close()

    # Kept beside the logs, for whoever reads a failure.
    (tmp_path / "redis-monitor.txt").write_text(broker)
    (tmp_path / "responses.txt").write_text("\n\n".join(f"--- {p}\n{t}" for p, t in recorder.seen))
    tables = dump_tables(private_pg)
    check_error_paths_were_taken(tables, recorder, broker)

    secret_list = [
        Secret("upstream key (accepted)", good_key, good_key),
        Secret("upstream key (refused with 401)", bad_key, bad_key),
        Secret("tenant A's API key", key_a, key_a.split("_", 2)[2]),
        Secret("tenant B's API key", key_b, key_b.split("_", 2)[2]),
        Secret("tenant A's API key, mistyped", mistyped, mistyped.split("_", 2)[2][:-1]),
        Secret("a wrong API key (tenant A's prefix)", wrong, wrong.split("_", 2)[2]),
        Secret("tenant A's webhook secret", whsec_a1, whsec_a1.removeprefix("whsec_")),
        Secret("tenant A's rotated webhook secret", whsec_a2, whsec_a2.removeprefix("whsec_")),
        Secret("tenant B's webhook secret", whsec_b, whsec_b.removeprefix("whsec_")),
        Secret("the database password", db_password, db_password),
        Secret("the webhook URL's password", hook_password, hook_password, in_stored=True),
        Secret("the webhook URL's token", hook_token, hook_token, in_stored=True),
    ]
    hay = Haystacks()
    for path in sorted(tmp_path.glob("*.log")):
        hay.logs[path.name] = path.read_text(errors="replace")
    hay.broker["redis MONITOR"] = with_base64_decoded(broker)
    for table, rows in tables.items():
        for n, row in enumerate(rows):
            for column, value in row.items():
                if table == "webhook_secrets" and column == "secret":
                    continue  # in clear by design: signing needs it
                if value is not None:
                    hay.stored[f"{table}[{n}].{column}"] = str(value)
    for n, (path, text) in enumerate(recorder.seen):
        if not path.startswith("/v1/webhooks/secret"):  # they hand the tenant its own secret
            hay.responses[f"response #{n} to {path}"] = text
    hay.metrics = metrics
    hay.cli = cli

    assert {"api.log", "worker.log", "mock.log"} <= set(hay.logs), list(hay.logs)
    assert "pcq_upstream_requests_total" in metrics["worker metrics"], metrics["worker metrics"]
    assert 'route="/console/jobs/{job_id}"' in metrics["API /metrics"], metrics["API /metrics"]
    # The cookies kept out of the search held what they should: each tenant's key.
    assert [k for k in (key_a, key_b) if any(k in c for c in recorder.cookies_set)] == [key_a, key_b]

    # The search finds what it looks for: where a secret is by design, it is found; and the
    # broker's messages were read (each job id is in one, inside its base64 body).
    by_design = Haystacks(
        cli={"pcq keys create": "".join(created.values())},
        stored={"webhook_secrets": str(tables["webhook_secrets"])},
        responses={
            f"#{n}": t for n, (p, t) in enumerate(recorder.seen) if p.startswith("/v1/webhooks/secret")
        },
    )
    found = {line.split(" in ", 1)[0] for line in find_leaks(secret_list, by_design, (good_key, bad_key))}
    assert found == {s.name for s in secret_list if s.name.startswith("tenant")}, (
        found
    )  # mistyped: its pieces
    for job in tables["jobs"]:
        assert job["id"] in hay.broker["redis MONITOR"], job["id"]

    leaks = find_leaks(secret_list, hay, upstream_keys=(good_key, bad_key))
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


def find_leaks(secret_list: list[Secret], hay: Haystacks, upstream_keys: tuple[str, ...]) -> list[str]:
    leaks = []
    kinds = {
        "log": hay.logs,
        "broker message": hay.broker,
        "stored value": hay.stored,
        "API response": hay.responses,
        "metrics scrape": hay.metrics,
        "client output": hay.cli,
    }
    for secret in secret_list:
        needles = secret.needles()
        for kind, texts in kinds.items():
            if secret.in_stored and kind in ("stored value", "API response", "client output"):
                continue
            for where, text in texts.items():
                if where == "mock.log" and secret.value in upstream_keys:
                    continue  # the upstream receives its keys: that is its job
                for needle in needles:
                    if needle in text:
                        at = text.index(needle)
                        excerpt = text[max(0, at - 150) : at + len(needle) + 50].replace("\n", "⏎")
                        leaks.append(f"{secret.name} in {kind} {where}: …{excerpt}…")
                        break
    return leaks


def check_error_paths_were_taken(
    tables: dict[str, list[dict[str, Any]]], recorder: Recorder, broker: str
) -> None:
    """So that the search cannot pass on a run that met no trouble."""
    attempts = tables["attempts"]
    codes = {a["status_code"] for a in attempts}
    classes = {a["error_class"] for a in attempts}
    # A job whose first call went to the refused key ended there (401), so each other path
    # has three jobs: one of them, at least, gets the accepted key.
    assert {401, 429, 403} <= codes, codes
    assert any(c is not None and c >= 500 for c in codes), codes
    assert {"timeout", "malformed", "rate_limited", "server_error", "http_4xx"} <= classes, classes
    assert any(j["status"] == "succeeded" for j in tables["jobs"])
    errors = [j["error"] for j in tables["jobs"]]
    assert any(e and "401" in e for e in errors), errors
    hooks = tables["webhook_attempts"]
    assert {500, 200} <= {h["status_code"] for h in hooks}
    assert {e["status"] for e in tables["webhook_events"]} >= {"failed", "delivered"}
    statuses = {text.split(" ", 1)[0] for _, text in recorder.seen}
    assert {"200", "202", "401", "404", "409", "422"} <= statuses, statuses
    assert "LPUSH" in broker.upper() or "lpush" in broker, broker[:2000]
