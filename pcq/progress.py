"""Progress bars for long CLI waits."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from pcq.client import PcqClient

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_with_bar(client: PcqClient, batch_id: str, total: int) -> dict[str, Any]:
    with tqdm(total=total, unit="job", desc=batch_id[:16], file=sys.stderr) as bar:

        def update(state: dict[str, Any]) -> None:
            finished = sum(state["counts"][s] for s in TERMINAL)
            bar.set_postfix(failed=state["counts"]["failed"], running=state["counts"]["running"])
            bar.update(finished - bar.n)

        return client.wait(batch_id, on_progress=update)
