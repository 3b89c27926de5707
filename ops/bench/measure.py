"""What the benchmark reads from the machine: CPU and memory per process, from /proc.

* Our own processes (worker, API, mock, ceiling, naive peer): utime + stime of the PID, as a
  delta over a phase, and VmHWM (peak resident set) at the end of the phase.
* PostgreSQL: every server process whose title names the phase's own database (its backends
  and autovacuum workers) is sampled every ``interval`` seconds; a backend's CPU is its
  last-seen total minus its total when the phase began (0 for backends born during the
  phase). A backend that exits between two samples loses at most one interval of CPU. The
  server-wide helpers (walwriter, checkpointer, background writer, ...) are reported apart,
  as ``pg_aux``: they work for every database of the server.
* Redis: ``INFO cpu`` of the server (used_cpu_user + used_cpu_sys) as a delta; server-wide.
* The machine: /proc/stat busy time, so that CPU nobody in the list used ("other") shows
  when something else ran during a phase.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

TICK = os.sysconf("SC_CLK_TCK")
PG_AUX = ("walwriter", "checkpointer", "background writer", "logical replication", "autovacuum launcher")


def proc_cpu(pid: int) -> float | None:
    """utime + stime of one process in seconds, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / TICK


_NOT_POSTGRES: set[int] = set()


def wait_quiet(threshold_cores: float = 0.3, window_s: float = 2.0, max_wait_s: float = 90.0) -> float:
    """Wait until the machine is nearly idle (other work would skew a phase); returns the busy
    cores of the last window. Gives up after ``max_wait_s`` (the phase then records it)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window_s)
        cores = (machine_busy_seconds() - b0) / window_s
        if cores <= threshold_cores or time.monotonic() > deadline:
            return round(cores, 2)


def code_fingerprint(
    root: Path, packages: tuple[str, ...] = ("pcq", "api", "worker", "shell", "mock_upstream")
) -> str:
    """Changes when any source file of the service changes (path, size, mtime)."""
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            st = path.stat()
            h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def postgres_processes() -> dict[int, str]:
    """PID -> process title of every PostgreSQL server process on this machine.

    Processes whose name is not ``postgres`` are remembered and skipped on later calls, so a
    sample costs a directory listing plus a read per PostgreSQL process.
    """
    out: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in _NOT_POSTGRES:
            continue
        pid = int(entry.name)
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
                _NOT_POSTGRES.add(pid)
                continue
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("postgres: "):
            out[pid] = title.strip()
    return out


def redis_cpu(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def sockets_to_port(pid: int, port: int) -> int:
    """Established TCP connections a process holds to ``port`` (its calls in flight)."""
    inodes: set[str] = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if cols[3] == "01" and remote_port == port and cols[9] in inodes:
                count += 1
    return count


@dataclass
class PhaseMeter:
    """CPU and peak memory of one benchmark phase. ``start()``, run the phase, ``stop()``."""

    procs: dict[str, int]  # name -> pid of our own processes
    dbname: str | None = None
    redis_url: str | None = None
    interval: float = 0.1
    _cpu0: dict[str, float] = field(default_factory=dict)
    _pg0: dict[int, float] = field(default_factory=dict)
    _pg_last: dict[int, float] = field(default_factory=dict)
    _pg_kind: dict[int, str] = field(default_factory=dict)
    _rss_peak: dict[str, int] = field(default_factory=dict)
    _redis0: float = 0.0
    _busy0: float = 0.0
    _t0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _classify(self, title: str) -> str | None:
        if self.dbname and f" {self.dbname} " in f"{title} ":
            return "postgres"
        if any(aux in title for aux in PG_AUX):
            return "pg_aux"
        return None

    def _sample_pg(self, first: bool) -> None:
        for pid, title in postgres_processes().items():
            kind = self._pg_kind.get(pid) or self._classify(title)
            if kind is None:
                continue
            cpu = proc_cpu(pid)
            if cpu is None:
                continue
            if pid not in self._pg_kind:
                self._pg_kind[pid] = kind
                # A process that existed before the phase counts from here; one born during
                # the phase counts from its birth.
                self._pg0[pid] = cpu if first or kind == "pg_aux" else 0.0
            self._pg_last[pid] = cpu

    def _sample_rss(self) -> None:
        for name, pid in self.procs.items():
            rss = proc_status_kb(pid, "VmRSS")
            if rss is not None:
                self._rss_peak[name] = max(self._rss_peak.get(name, 0), rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_pg(first=False)
            self._sample_rss()

    def start(self) -> None:
        _NOT_POSTGRES.clear()  # PIDs may have been reused since the last phase
        self._t0 = time.perf_counter()
        self._busy0 = machine_busy_seconds()
        self._cpu0 = {n: c for n, p in self.procs.items() if (c := proc_cpu(p)) is not None}
        if self.redis_url:
            self._redis0 = redis_cpu(self.redis_url)
        self._sample_pg(first=True)
        self._thread = threading.Thread(target=self._loop, name="phase-meter", daemon=True)
        self._thread.start()

    def stop(self, extra_cpu: dict[str, float] | None = None) -> dict[str, Any]:
        """CPU seconds per process over the phase, peak RSS in MB, wall seconds.

        ``extra_cpu`` adds CPU seconds measured elsewhere (processes that report their own).
        """
        self._sample_pg(first=False)
        self._sample_rss()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = time.perf_counter() - self._t0
        cpu: dict[str, float] = {}
        hwm: dict[str, float] = {}
        for name, pid in self.procs.items():
            now = proc_cpu(pid)
            if now is not None and name in self._cpu0:
                cpu[name] = now - self._cpu0[name]
            peak = proc_status_kb(pid, "VmHWM")
            if peak is not None:
                hwm[name] = round(peak / 1024, 1)
        cpu.update(extra_cpu or {})
        backends = [p for p, k in self._pg_kind.items() if k == "postgres"]
        cpu["postgres"] = sum(self._pg_last[p] - self._pg0[p] for p in backends)
        cpu["pg_aux"] = sum(
            self._pg_last[p] - self._pg0[p] for p, k in self._pg_kind.items() if k == "pg_aux"
        )
        if self.redis_url:
            cpu["redis"] = redis_cpu(self.redis_url) - self._redis0
        busy = machine_busy_seconds() - self._busy0
        cpu["other"] = max(0.0, busy - sum(cpu.values()))
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "machine_busy_s": busy,
            "peak_rss_mb": hwm,
            "sampled_rss_mb": {k: round(v / 1024, 1) for k, v in self._rss_peak.items()},
            "pg_backends_seen": len(backends),
        }
