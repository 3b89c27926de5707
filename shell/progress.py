"""Showing a batch's progress as it arrives (``pcq watch``, ``pcq submit --wait``, the demo).

At a terminal, a tqdm bar of ended jobs (its rate and ETA) with the failed, cancelled and
running counts beside it. Anywhere else (a pipe, a log file, CI) plain lines, one every
``plain_every`` seconds at most and one at the end, each with the same figures: a bar redrawn
with carriage returns is noise in a log.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from pcq.models import TERMINAL_STATUSES, JobStatus


def ended(batch: dict[str, Any]) -> int:
    return sum(batch["counts"].get(s, 0) for s in TERMINAL_STATUSES)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class BatchProgress:
    """Fed every state of the batch (a BatchOut as JSON); ``close`` when it is over."""

    def __init__(self, batch_id: str, out: TextIO | None = None, plain_every: float = 5.0) -> None:
        self.batch_id = batch_id
        self.out = out if out is not None else sys.stderr
        self.plain_every = plain_every
        self.tty = self.out.isatty()
        self._bar: tqdm[Any] | None = None
        self._start: tuple[float, int] | None = None  # (when, jobs ended) at the first state seen
        self._printed = float("-inf")

    def show(self, batch: dict[str, Any]) -> None:
        now, done = time.monotonic(), ended(batch)
        if self._start is None:
            self._start = (now, done)
        if self.tty:
            self._draw(batch, done)
        elif now - self._printed >= self.plain_every or batch["done"]:
            print(self.line(batch, now), file=self.out, flush=True)  # noqa: T201
            self._printed = now

    def _draw(self, batch: dict[str, Any], done: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=batch["total"], initial=done, unit="job", desc=self.batch_id[:16], file=self.out
            )
        counts = batch["counts"]
        self._bar.set_postfix(
            failed=counts[JobStatus.FAILED],
            cancelled=counts[JobStatus.CANCELLED],
            running=counts[JobStatus.RUNNING],
            refresh=False,
        )
        self._bar.update(done - self._bar.n)

    def line(self, batch: dict[str, Any], now: float) -> str:
        """One plain progress line: ended of total, failures, rate since the watch began, ETA."""
        done, total, counts = ended(batch), batch["total"], batch["counts"]
        since, done_then = self._start or (now, done)
        rate = (done - done_then) / (now - since) if now > since else 0.0
        left = total - done
        eta = "0s" if left <= 0 else (_duration(left / rate) if rate > 0 else "?")
        percent = 100 * done // total if total else 100
        return (
            f"{self.batch_id}: {done}/{total} ended ({percent}%), {counts[JobStatus.FAILED]} failed, "
            f"{counts[JobStatus.CANCELLED]} cancelled, {counts[JobStatus.RUNNING]} running, "
            f"{rate:.1f} jobs/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def export_bar(total: int, batch_id: str) -> tqdm[Any]:
    """Jobs written by ``pcq export``, on stderr; shown only when stderr is a terminal."""
    return tqdm(total=total, unit="job", desc=batch_id[:16], file=sys.stderr, disable=None)
