"""``pcq watch BATCH_ID`` and ``pcq submit --wait``: follow a batch's event stream to its end.

The stream is ``GET /v1/batches/{id}/events`` (api/events.py), read with httpx-sse as any SSE
client reads it. A connection that drops, times out (the server pings every 15 s, the client
waits 60 s) or ends before ``batch.completed`` is opened again with ``Last-Event-ID``, so only
newer events come; the waits between attempts grow from 0.5 s to 15 s, and after
``MAX_FAILURES`` attempts in a row with no event the watch gives up. A ``429`` or ``503`` is
waited out (``Retry-After``) like a drop; any other refusal ends the watch at once.

Exit status of ``pcq watch``: 0 when the batch completed and every job succeeded; 1 when it
completed with failed or cancelled jobs (as ``pcq submit --wait``: a script can tell "all
answers are in" from "some are missing" without parsing); 2 when the watch could not see the
batch to its end (unknown batch, bad key, the API unreachable past the retry budget, Ctrl-C):
the batch's outcome is then unknown, which is neither of the others.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from pcq.models import JobStatus
from shell.client import ApiError, PcqClient
from shell.progress import BatchProgress

PROGRESS, COMPLETED = "batch.progress", "batch.completed"
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # then 15 s each time
MAX_FAILURES = 20  # attempts in a row with no event (about 4 minutes): the watch gives up
RETRYABLE = (429, 502, 503, 504)

EXIT_SUCCEEDED, EXIT_SOME_FAILED, EXIT_UNKNOWN = 0, 1, 2


class WatchFailed(ApiError):
    """The batch could not be followed to its end; the message says why (an ApiError, so the
    CLI reports it as one line, as any refusal)."""


def follow(
    client: PcqClient,
    batch_id: str,
    on_state: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every state of the batch to ``on_state`` until it completes; returns the final one."""
    last_id: str | None = None
    failures = 0
    while True:
        delay: float | None = None
        why = "the stream ended before batch.completed"
        try:
            with client.batch_events(batch_id, last_id) as resp:
                if resp.status_code == 204:  # it ended, and the last event we saw said so
                    final = client.batch(batch_id)
                    on_state(final)
                    return final
                for event in EventSource(resp).iter_sse():
                    if event.event not in (PROGRESS, COMPLETED):
                        continue
                    failures = 0
                    last_id = event.id or last_id
                    state: dict[str, Any] = json.loads(event.data)
                    on_state(state)
                    if event.event == COMPLETED:
                        return state
        except ApiError as exc:
            if exc.status not in RETRYABLE:
                raise WatchFailed(str(exc)) from None
            why, delay = str(exc), exc.retry_after
        except (httpx.TransportError, SSEError) as exc:  # dropped, refused, timed out, not SSE
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        failures += 1
        if failures >= MAX_FAILURES:
            raise WatchFailed(f"gave up after {failures} attempts to follow the batch ({why})")
        time.sleep(delay if delay is not None else RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1])


def watch_batch(client: PcqClient, batch_id: str) -> dict[str, Any]:
    """Follow the batch with a progress bar (stderr) until it completes; the final state."""
    progress = BatchProgress(batch_id)
    try:
        return follow(client, batch_id, progress.show)
    finally:
        progress.close()


def summary(batch: dict[str, Any]) -> str:
    counts = ", ".join(f"{status} {n}" for status, n in batch["counts"].items() if n)
    return f"batch {batch['id']} completed: {counts or 'no jobs'} (of {batch['total']})"


def exit_status(batch: dict[str, Any]) -> int:
    counts = batch["counts"]
    return EXIT_SOME_FAILED if counts[JobStatus.FAILED] or counts[JobStatus.CANCELLED] else EXIT_SUCCEEDED


def watch_command(client: PcqClient, batch_id: str) -> int:
    """``pcq watch``: the bar on stderr, the summary line on stdout, the exit status above."""
    try:
        batch = watch_batch(client, batch_id)
    except WatchFailed as exc:
        print(f"pcq: cannot watch batch {batch_id}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_UNKNOWN
    except KeyboardInterrupt:  # the user stopped watching; the batch goes on
        return EXIT_UNKNOWN
    finally:
        client.close()
    print(summary(batch))  # noqa: T201
    return exit_status(batch)
