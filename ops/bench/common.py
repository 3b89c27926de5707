"""Pieces every benchmark mode shares: databases, Redis, processes, timing queries, stats."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from migrations.migrate import upgrade_to_head

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Database:
    name: str
    url: str  # postgresql://... (what pcq's settings take)

    @property
    def sa_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)


@contextlib.contextmanager
def fresh_database(pg_admin: str, prefix: str, *, migrate: bool) -> Iterator[Database]:
    """A new database for one phase, dropped (with its connections) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    db = Database(name, pg_admin.rsplit("/", 1)[0] + f"/{name}")
    try:
        if migrate:
            upgrade_to_head(db.sa_url)
        yield db
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_own_redis_db(url: str, allowed: Sequence[int] = (11, 12)) -> None:
    """FLUSHDB on the benchmark's own Redis database (never another one, never FLUSHALL)."""
    client = redis.Redis.from_url(url)
    try:
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        if db not in allowed:
            raise SystemExit(f"refusing to FLUSHDB Redis db {db}: the benchmark owns only {list(allowed)}")
        client.flushdb()
    finally:
        client.close()


def redis_script_calls(url: str) -> int:
    """EVAL + EVALSHA calls the Redis server has run (server-wide, from INFO commandstats)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as c:
        return list(c.execute(sql, params).fetchall())


def timing_rows(url: str, sql: str, *params: Any) -> tuple[list[float], float, float]:
    """(latencies in s, first created epoch, last finished epoch) from (created, finished) rows."""
    rows: list[tuple[datetime, datetime]] = [
        (r[0], r[1]) for r in query(url, sql, *params) if r[1] is not None
    ]
    lat = [(f - c).total_seconds() for c, f in rows]
    return lat, min(c for c, _ in rows).timestamp(), max(f for _, f in rows).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}); see {path}")
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} did not appear in {path} within {timeout} s")


def spawn_python(
    args: list[str], env: dict[str, str], log: Path | None, *, stdin: int | None = None
) -> subprocess.Popen[bytes]:
    """``python <args>`` from the repository root, in its own process group."""
    return subprocess.Popen(  # noqa: S603  (our interpreter, our modules)
        [sys.executable, *args],
        env=env,
        cwd=REPO,
        stdin=stdin,
        stdout=subprocess.PIPE if log is None else open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )


def mock_reset(mock_url: str) -> None:
    httpx.post(f"{mock_url}/mock/reset", timeout=10).raise_for_status()


def mock_stats(mock_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{mock_url}/mock/stats", timeout=10).json()
    stats.pop("by_content_hash", None)
    return stats


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("celery", "kombu", "sqlalchemy", "psycopg", "aiohttp", "httpx", "fastapi"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    out["uvicorn"] = version("uvicorn")
    with contextlib.suppress(Exception):
        out["postgresql"] = query("postgresql://postgres@127.0.0.1:5432/postgres", "SHOW server_version")[0][
            0
        ]
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url("redis://127.0.0.1:6379/12")
        out["redis"] = str(client.info("server")["redis_version"])
        client.close()
    return out


def machine() -> dict[str, Any]:
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    return {"nproc": os.cpu_count(), "mem_gb": round(mem_kb / 1024 / 1024, 1), "cpu": model}


def git_state() -> str:
    try:
        rev = subprocess.run(  # noqa: S603
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,  # noqa: S607
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" (+ uncommitted changes)" if dirty else "")
