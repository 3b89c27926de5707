"""Shared machinery of the fault tests: private Redis / PostgreSQL servers, a stack on short
settings, submission over HTTP, polling the database, and the invariants every test checks.

Every process started here is ours, runs in its own process group, and is stopped by its PID
(or, for PostgreSQL, by ``pg_ctl`` on our own data directory); nothing shared is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import pytest
import redis
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pcq.db import make_session_factory, unit_of_work
from pcq.jobs import dispatch
from pcq.models import Attempt, Citation, Job, Result, Usage, utcnow
from pcq.models.job import TERMINAL_STATUSES
from pcq.queue import Enqueuer, make_celery
from pcq.settings import load_settings, normalize_database_url
from pcq.tenants import create_key_at
from shell.procs import free_port
from tests.audit import basis_citations_in_raw
from tests.stack import Stack, stack_env

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

# The short settings every fault test runs with (all real settings, see pcq/settings.py).
FAST_SETTINGS = {
    "PCQ_LEASE_SECONDS": "3",
    "PCQ_SWEEP_INTERVAL_SECONDS": "0.5",
    "PCQ_REQUEUE_AFTER_SECONDS": "5",
    "PCQ_RETRY_BASE_SECONDS": "0.2",
    "PCQ_RETRY_MAX_SECONDS": "1",
}


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine without the service; fail under CI=true."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: real-service tests must run, not skip)")
    pytest.skip(reason)


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a process we started (its pgid is its pid)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def content_digest(content: str) -> str:
    """The key the mock upstream uses in ``/mock/stats`` ``by_content_hash``."""
    return hashlib.blake2b(content.encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------- private Redis


class PrivateRedis:
    """A throw-away redis-server on a free port: no persistence, ours to flush and kill."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with self.client() as c:
                    return bool(c.ping())
            except redis.RedisError:
                return False

        wait_for("private redis to answer", up, timeout=10, interval=0.05)

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(messages waiting in the queue list, messages delivered but not acked)."""
        with self.client() as c:
            return int(c.llen(queue)), int(c.hlen("unacked"))


# -------------------------------------------------------------------- private PostgreSQL


class PrivatePostgres:
    """A PostgreSQL 15 cluster of our own (initdb + pg_ctl as the ``postgres`` OS user)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            unavailable(f"PostgreSQL 15 binaries not found in {PG_BIN}")
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                unavailable("runuser is needed to run initdb as the postgres user")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        import pwd

        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("there is no postgres OS user to own a private cluster")
        if os.geteuid() not in (0, pg_user.pw_uid):
            unavailable("a private cluster needs root (runuser) or the postgres user")
        # Not under pytest's tmp_path: that tree is private to root and postgres could not enter it.
        self.root = Path(tempfile.mkdtemp(prefix="pcq-fault-pg-"))
        os.chown(self.root, pg_user.pw_uid, pg_user.pw_gid)
        os.chmod(self.root, 0o700)
        self.data = self.root / "data"
        self.port = free_port()
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout}\n{out.stderr}")

    def init(self) -> None:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "--no-instructions",
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            # fsync=off only matters if the machine crashes; every stop here is clean
            # ("fast"), so each committed transaction survives it, as on a real server.
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            *extra,
            action,
        )

    def start(self) -> None:
        self._ctl("start")
        self.started = True

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """A clean, fast shutdown: sessions are cut, committed work is kept."""
        if self.started:
            try:
                self._ctl("stop", "-m", "fast")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
            self.started = False

    def _kill_postmaster(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------ the stack


def fault_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    env = stack_env(database_url, redis_url)
    env.update(FAST_SETTINGS)
    env.update(overrides)
    return env


def start_stack(
    workdir: Path, database_url: str, redis_url: str, *mock_args: str, worker: bool = True, **overrides: str
) -> Stack:
    stack = Stack(fault_env(database_url, redis_url, **overrides), workdir)
    try:
        stack.start_mock(*mock_args)
        stack.start_api()
        if worker:
            stack.start_worker()
    except BaseException:
        stack.stop_all()
        raise
    return stack


def wait_worker_ready(stack: Stack, name: str = "worker", timeout: float = 20) -> None:
    """Celery prints 'ready.' once it consumes; the engine's sweeper starts at that moment."""
    log = stack.log(name)

    def ready() -> bool:
        proc = stack.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}\n{stack.logs()}")
        return log.exists() and " ready." in log.read_text(errors="replace")

    wait_for(f"{name} to be ready", ready, timeout)


@dataclass
class Tenant:
    stack: Stack
    key: str

    @classmethod
    def create(cls, stack: Stack, database_url: str, name: str = "faults") -> Tenant:
        return cls(stack, create_key_at(database_url, name))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def submit_batch(
        self, requests: list[dict[str, Any]], timeout: float = 30, **params: str
    ) -> tuple[str, list[str]]:
        """POST one JSONL batch (``params``: its query, e.g. ``priority``); returns (batch id,
        job ids in line order)."""
        lines = [json.dumps({"custom_id": f"c{i}", "body": body}) for i, body in enumerate(requests)]
        r = httpx.post(
            f"{self.stack.api_url}/v1/batches",
            params=params,
            content="\n".join(lines) + "\n",
            headers={**self.headers, "Content-Type": "application/x-ndjson"},
            timeout=timeout,
        )
        assert r.status_code == 202, r.text
        batch_id: str = r.json()["id"]
        page = httpx.get(
            f"{self.stack.api_url}/v1/jobs",
            params={"batch_id": batch_id, "limit": 1000},
            headers=self.headers,
            timeout=timeout,
        ).json()
        by_custom = {j["custom_id"]: j["id"] for j in page["data"]}
        return batch_id, [by_custom[f"c{i}"] for i in range(len(requests))]

    def submit_job(self, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
        return httpx.post(
            f"{self.stack.api_url}/v1/jobs", json={"request": body}, headers=self.headers, timeout=timeout
        )


def chat(content: str, *, model: str = "lite", stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return body


# ------------------------------------------------------------------------- the database


@dataclass
class JobRow:
    id: str
    status: str
    attempts: int
    error_code: str | None
    error: str | None
    content: str
    lease_until: datetime | None
    enqueued_at: datetime | None
    lease_losses: int = 0


@dataclass
class AttemptRow:
    job_id: str
    number: int
    started_at: datetime
    finished_at: datetime
    latency_ms: int
    outcome: str
    error_class: str | None
    status_code: int | None
    retry_after_seconds: float | None


@dataclass
class Report:
    jobs: dict[str, JobRow]
    attempts: dict[str, list[AttemptRow]]
    results: dict[str, int]  # job id -> result rows
    result_attempt: dict[str, int]  # job id -> the attempt number that stored it
    raw_bodies: dict[str, str]
    usage: dict[str, int]
    citations: dict[str, int]
    citations_in_raw: dict[str, int]
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def attempt_rows(self) -> int:
        return sum(len(v) for v in self.attempts.values())

    @property
    def attempts_claimed(self) -> int:
        return sum(j.attempts for j in self.jobs.values())


class Db:
    """Reads for the tests. No pool: each read opens a fresh connection, so a restarted
    server costs one failed read, not a stale pool."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(normalize_database_url(url), poolclass=NullPool)

    def close(self) -> None:
        self.engine.dispose()

    def _read(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine) as s:
            return fn(s)

    def jobs(self, ids: Iterable[str]) -> dict[str, JobRow]:
        ids = list(ids)

        def read(s: Session) -> dict[str, JobRow]:
            return {
                j.id: JobRow(
                    j.id,
                    j.status,
                    j.attempts,
                    j.error_code,
                    j.error,
                    json.loads(j.request_json)["messages"][-1]["content"],
                    j.lease_until,
                    j.enqueued_at,
                    j.lease_losses,
                )
                for j in s.scalars(select(Job).where(Job.id.in_(ids)))
            }

        return self._read(read)

    def batch_job_ids(self, batch_id: str) -> list[str]:
        return self._read(
            lambda s: list(s.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.custom_id)))
        )

    def try_jobs(self, ids: Iterable[str]) -> dict[str, JobRow] | None:
        """Like jobs(), but None while the database does not answer (a restart)."""
        try:
            return self.jobs(ids)
        except Exception:
            return None

    def wait_terminal(self, ids: list[str], timeout: float, stack: Stack | None = None) -> dict[str, JobRow]:
        deadline = time.monotonic() + timeout
        last: dict[str, JobRow] | None = None
        while time.monotonic() < deadline:
            rows = self.try_jobs(ids)
            if rows is not None:
                last = rows
                if len(rows) == len(ids) and all(j.status in TERMINAL_STATUSES for j in rows.values()):
                    return rows
            time.sleep(0.2)
        states = {k: (v.status, v.attempts) for k, v in (last or {}).items()}
        logs = stack.logs() if stack is not None else ""
        raise AssertionError(f"jobs not terminal after {timeout} s: {states}\n{logs}")

    def report(self, ids: Iterable[str]) -> Report:
        ids = list(ids)

        def read(s: Session) -> Report:
            jobs = self.jobs(ids)
            attempts: dict[str, list[AttemptRow]] = {i: [] for i in ids}
            for a in s.scalars(select(Attempt).where(Attempt.job_id.in_(ids)).order_by(Attempt.number)):
                attempts[a.job_id].append(
                    AttemptRow(
                        a.job_id,
                        a.number,
                        a.started_at,
                        a.finished_at,
                        a.latency_ms,
                        a.outcome,
                        a.error_class,
                        a.status_code,
                        a.retry_after_seconds,
                    )
                )
            results: dict[str, int] = dict.fromkeys(ids, 0)
            result_attempt: dict[str, int] = {}
            raw: dict[str, str] = {}
            for r in s.scalars(select(Result).where(Result.job_id.in_(ids))):
                results[r.job_id] += 1
                result_attempt[r.job_id] = r.attempt_number
                raw[r.job_id] = r.raw_body
            usage: dict[str, int] = dict.fromkeys(ids, 0)
            for job_id in s.scalars(select(Usage.job_id).where(Usage.job_id.in_(ids))):
                usage[job_id] += 1
            citations: dict[str, int] = dict.fromkeys(ids, 0)
            for job_id in s.scalars(select(Citation.job_id).where(Citation.job_id.in_(ids))):
                citations[job_id] += 1
            by_status: dict[str, int] = {}
            for j in jobs.values():
                by_status[j.status] = by_status.get(j.status, 0) + 1
            return Report(
                jobs=jobs,
                attempts=attempts,
                results=results,
                result_attempt=result_attempt,
                raw_bodies=raw,
                usage=usage,
                citations=citations,
                citations_in_raw={k: basis_citations_in_raw(v) for k, v in raw.items()},
                by_status=by_status,
            )

        return self._read(read)


def check_invariants(db: Db, ids: list[str]) -> Report:
    """What must hold after any fault, for every accepted job:

    - it reached a terminal state;
    - a succeeded job has exactly one result row (and its usage row); any other job has none;
    - its citation rows are exactly the citations in the stored raw body (no duplicates);
    - its attempt rows have distinct numbers within 1..jobs.attempts (a row per upstream call
      that came back to a live worker; the counter counts claims, so it can be higher).
    """
    rep = db.report(ids)
    assert set(rep.jobs) == set(ids), "an accepted job is missing from the database"
    for job_id, job in rep.jobs.items():
        assert job.status in TERMINAL_STATUSES, (job_id, job.status)
        if job.status == "succeeded":
            assert rep.results[job_id] == 1, (job_id, rep.results[job_id])
            assert rep.usage[job_id] == 1, job_id
            assert rep.citations[job_id] == rep.citations_in_raw[job_id], job_id
            # The result was stored by an attempt that has a successful attempt row.
            ok = [a.number for a in rep.attempts[job_id] if a.outcome == "ok"]
            assert rep.result_attempt[job_id] in ok, (job_id, ok, rep.result_attempt[job_id])
        else:
            assert rep.results[job_id] == 0, job_id
            assert rep.citations[job_id] == 0, job_id
        numbers = [a.number for a in rep.attempts[job_id]]
        assert len(numbers) == len(set(numbers)), (job_id, numbers)
        assert all(1 <= n <= job.attempts for n in numbers), (job_id, numbers, job.attempts)
    return rep


def mock_calls(stats: dict[str, Any], content: str) -> int:
    """Upstream requests the mock saw for one message content (needs a directive in it),
    from a ``Stack.mock_stats()`` taken before the stack stopped."""
    return int(stats["by_content_hash"].get(content_digest(content), 0))


def dispatch_waiting(stack: Stack, engine: Engine) -> list[str]:
    """Send every job waiting for dispatch, as a dispatcher in another worker would (mark them
    sent and send their messages, in one transaction): for tests whose only worker is stopped."""
    settings = load_settings(
        {"REDIS_URL": stack.env["REDIS_URL"], "PCQ_QUEUE_NAME": stack.env["PCQ_QUEUE_NAME"]}
    )
    enqueuer = Enqueuer(make_celery(settings, publisher=True), settings.queue_name)
    with unit_of_work(make_session_factory(engine)) as session:
        now = utcnow()
        groups = dispatch.backlog(session, now=now)
        ids = dispatch.take(session, [(g, g.waiting) for g in groups], now=now)
        # One message each: a stopped worker's pending BRPOP takes one message, not all.
        assert enqueuer.enqueue(ids, per_message=1) == len(ids)
    return ids
