"""Sampling profiles of the benchmarked processes with py-spy, and a summary of where CPU goes.

``Profiler`` runs ``py-spy record -f raw --nonblocking --gil`` on each process for a phase
(raw = collapsed stacks, one ``frame;frame;... count`` line per distinct stack; ``--gil``
keeps only samples of the thread holding the GIL, i.e. the Python CPU that the worker's
single interpreter can spend, not threads waiting on sockets). ``summarize`` turns
such a file into shares of the samples: by the package of the innermost frame ("self"), by
a few pcq/library stages anywhere on the stack ("inclusive"), and the top leaf functions.

    python -m ops.bench.profile bench-results/profile-worker.txt
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# Inclusive stages: a sample counts for a stage when any frame of its stack matches.
STAGES: dict[str, tuple[str, ...]] = {
    "db: store_outcomes (writer)": ("store_outcomes",),
    "db: claim_many": ("claim_many",),
    "db: sweeper/renewer": ("due_for_enqueue", "renew_leases", "clear_enqueued"),
    "upstream call (aiohttp)": ("UpstreamClient.call", "call (worker/upstream.py"),
    "parse answer (wire)": ("parse_completion", "_assemble_stream"),
    "limiter (redis)": ("KeyPool", "limiter.py"),
    "celery/kombu consume": ("kombu/", "celery/worker", "celery/concurrency"),
    "sqlalchemy": ("sqlalchemy/",),
    "psycopg": ("psycopg/",),
    "asyncio loop": ("asyncio/base_events.py",),
}


def _package(path: str) -> str:
    p = path.replace("\\", "/")
    if "site-packages/" in p:
        return p.split("site-packages/", 1)[1].split("/", 1)[0]
    for own in ("pcq/", "worker/", "api/", "shell/", "mock_upstream/", "ops/"):
        if p.startswith(own) or f"/{own}" in p:
            return own.rstrip("/")
    if "/lib/python3" in p:
        return "stdlib:" + p.rsplit("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return p or "?"


def summarize(raw: Path, top: int = 20) -> dict[str, object]:
    self_pkg: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    stage: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        m = _FRAME.match(frames[-1])
        func, file = (m["func"], m["file"]) if m else (frames[-1], "")
        self_pkg[_package(file)] += count
        leaf[f"{func} ({_package(file)})"] += count
        for name, needles in STAGES.items():
            if any(n in stack for n in needles):
                stage[name] += count
    share: dict[str, object] = {"samples": total}

    def pct(c: Counter[str], k: int) -> dict[str, float]:
        return {name: round(100 * v / total, 1) for name, v in c.most_common(k)} if total else {}

    share["self_by_package_pct"] = pct(self_pkg, top)
    share["inclusive_stage_pct"] = pct(stage, len(STAGES))
    share["top_leaf_functions_pct"] = pct(leaf, top)
    return share


class Profiler:
    """py-spy on a set of processes for the length of a phase (stopped with SIGINT)."""

    def __init__(self, outdir: Path, tag: str, rate: int = 100, gil_only: bool = True) -> None:
        self.gil_only = gil_only
        self.outdir = outdir
        self.tag = tag
        self.rate = rate
        self.files: dict[str, Path] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        exe = Path(sys.executable).with_name("py-spy")
        self.exe = str(exe) if exe.exists() else (shutil.which("py-spy") or "py-spy")

    def start(self, pids: dict[str, int]) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.outdir / f"profile-{self.tag}-{name}.txt"
            self.files[name] = out
            self._procs.append(
                subprocess.Popen(  # noqa: S603
                    [self.exe, "record", "-p", str(pid), "-r", str(self.rate), "-d", "3600"]
                    + ["-f", "raw", "-o", str(out), "--nonblocking"]
                    + (["--gil"] if self.gil_only else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def summaries(self) -> dict[str, object]:
        return {name: summarize(path) for name, path in self.files.items() if path.exists()}


def main() -> None:
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", type=Path, nargs="+")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    for raw in args.raw:
        print(raw)  # noqa: T201
        print(json.dumps(summarize(raw, args.top), indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
