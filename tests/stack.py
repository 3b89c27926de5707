"""Run the real processes (mock upstream, API, Celery worker) as users run them, through
``pcq <command>`` (shell.procs starts them, as ``pcq standalone`` does).

Shared by the end-to-end and fault tests and the benchmarks (ops/bench), so all of them drive
exactly what users run. The audit of the rows a run wrote is tests/audit.py.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shell.procs import free_port, spawn, stop, wait_http


@dataclass
class Stack:
    env: dict[str, str]
    workdir: Path
    api_url: str = ""
    mock_url: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_mock(self, *extra: str) -> None:
        port = free_port()
        self.procs["mock"] = spawn(
            ["mock-upstream", "--port", str(port), "--latency-ms", "20", *extra], self.env, self.log("mock")
        )
        self.mock_url = f"http://127.0.0.1:{port}"
        self.env["PARALLEL_BASE_URL"] = self.mock_url
        wait_http(f"{self.mock_url}/healthz", proc=self.procs["mock"])

    def start_api(self) -> None:
        port = free_port()
        self.procs["api"] = spawn(["api", "--port", str(port)], self.env, self.log("api"), cwd=self.workdir)
        self.api_url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.api_url}/healthz", proc=self.procs["api"])

    def start_worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        proc = spawn(["worker"], self.env, self.log(name), cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each process has used so far, from /proc."""
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def mock_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.mock_url}/mock/stats").json()
        return stats


def stack_env(database_url: str, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCQ_")}
    env.pop("REDIS_URL", None)
    env.update(
        DATABASE_URL=database_url,
        PARALLEL_API_KEY="sk-e2e-secret-key-0000",
        PCQ_QUEUE_NAME=f"pcq-test-{uuid.uuid4().hex[:8]}",
        PCQ_SWEEP_INTERVAL_SECONDS="0.5",
        PCQ_RETRY_BASE_SECONDS="0.2",
        PCQ_RETRY_MAX_SECONDS="1",
        PCQ_RATE_LIMIT_PER_MINUTE="60000",
        PCQ_LOG_LEVEL="INFO",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env
