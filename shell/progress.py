"""Progress bars for long CLI waits."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from pcq.models import TERMINAL_STATUSES, JobStatus
from shell.client import PcqClient


def wait_with_bar(client: PcqClient, batch_id: str, total: int) -> dict[str, Any]:
    with tqdm(total=total, unit="job", desc=batch_id[:16], file=sys.stderr) as bar:

        def update(state: dict[str, Any]) -> None:
            finished = sum(state["counts"][s] for s in TERMINAL_STATUSES)
            bar.set_postfix(
                failed=state["counts"][JobStatus.FAILED], running=state["counts"][JobStatus.RUNNING]
            )
            bar.update(finished - bar.n)

        return client.wait(batch_id, on_progress=update)


def export_bar(total: int, batch_id: str) -> tqdm[Any]:
    """Jobs written by ``pcq export``, on stderr; shown only when stderr is a terminal."""
    return tqdm(total=total, unit="job", desc=batch_id[:16], file=sys.stderr, disable=None)
