"""Reusing paid answers: a job with ``"reuse": "24h"`` takes the answer of a byte-identical
request of its tenant that succeeded within that window, instead of calling the upstream.

**Where it is decided: when a worker claims the job** (``lifecycle.claim_many``), not at intake.
The claim is the one moment every job passes through however it was sent (the dispatcher, the
API's direct send, the sweeper's resend, a duplicate message), and it runs in a transaction that
holds the job: so the decision is made once per claim, with the latest committed answers in
view, and a second copy of a message finds the job already decided (not claimable) and does
nothing. Deciding at intake would have needed a "follow job X" state that every path that ends
X (failure, cancel, budget, retry, lost lease) must remember to release; here a job that waits
is merely queued with a short delay, and is decided again at its next claim whatever became of
the job it waited for.

For each claimed job with ``reuse``, in id order:

1. **Reuse.** The tenant's newest succeeded job with the same ``request_sha256`` (the sha256 of
   the request text, computed at intake) whose answer came from a call made within the window:
   a job that reused an answer points to that call's job (``results.reused_from``), so the
   window always measures the age of the call, never of a copy. The job is stored succeeded at
   once with copies of that answer's rows (result, usage, basis fields, citations; the
   citations under the new job, tenant and batch, so ``/v1/citations`` and the audit see
   them); its claim's attempt is undone, no attempt row is written, and its webhook events are
   written as for any other success. No attempt: it costs nothing (``cost.spent`` sums
   attempts).
2. **Wait.** Else, if an identical request of the tenant is running (claimed by another
   transaction, or earlier in this claim), the job goes back to ``queued``, unsent, due again
   after a short delay (longer while the running call has been running long): at that claim it
   finds the answer (1), or, if that call failed or was cancelled, it calls itself (3).
3. **Call.** Else it calls, as a job without ``reuse`` does, and identical jobs claimed after
   it wait for it (2). So two identical requests in one batch make one call.

Two workers claiming identical requests at once must not both see "nothing running": on
PostgreSQL each claim takes a transaction-level advisory lock per (tenant, request hash) of its
reusing jobs, in key order, before it looks, so the second looks only after the first's claim
is committed (and sees it running). SQLite serialises writers anyway: the claim's UPDATE holds
the database until commit. Jobs without ``reuse`` take no lock and never wait; a job with
``reuse`` may still take their answers, or wait for their calls.

A waiting job whose call fails or is retried later may make an extra call (it waits only for a
*running* identical request, never a queued one, so two jobs can never wait for each other):
a paid answer is reused when there is one, but a missing one never blocks a job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from pcq.keys import LIFETIME_UNITS
from pcq.models import JobStatus
from pcq.repositories import jobs as job_rows
from pcq.repositories import results as result_rows

if TYPE_CHECKING:
    from pcq.jobs.lifecycle import ClaimedJob

MAX_WINDOW = timedelta(days=30)  # a month-old answer is as old as reuse goes
WAIT_SECONDS = 1.0  # a job whose identical request is running is claimed again after this...
MAX_WAIT_SECONDS = 30.0  # ...or after half as long as that call has run, up to this

DURATION_PATTERN = "^[0-9]{1,9}[smhdw]$"  # also the JSON Schema pattern of the API's reuse fields
_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")  # DURATION_PATTERN, its parts grouped


def parse_window(text: str) -> int:
    """A ``reuse`` duration (``30s``, ``15m``, ``24h``, ``7d``, ``2w``) in seconds; ValueError,
    saying what to give, for anything else, for 0, and for more than 30 days. The units are
    those of ``pcq keys create --expires-in`` (pcq.keys.parse_lifetime)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: give a whole number and a unit s, m, h, d or w (24h, 7d)"
        )
    seconds = int(match[1]) * LIFETIME_UNITS[match[2]]
    if seconds <= 0:
        raise ValueError(f"{text!r}: the window must be more than 0")
    if seconds > MAX_WINDOW.total_seconds():
        raise ValueError(f"{text!r}: at most {MAX_WINDOW.days}d")
    return seconds


@dataclass
class Decided:
    """What the claim does with its jobs that asked for reuse (the others all call)."""

    reused: list[tuple[ClaimedJob, str]] = field(default_factory=list)  # (job, the job it reuses)
    waiting: dict[str, datetime] = field(default_factory=dict)  # job id -> claimed again after

    def skipped(self) -> set[str]:
        """The ids that make no call now."""
        return {j.id for j, _ in self.reused} | set(self.waiting)


def decide(session: Session, claimed: Sequence[ClaimedJob], *, now: datetime) -> Decided:
    """Reuse, wait or call, for each claimed job (the module docstring); the claims of those
    that reuse or wait are undone by ``apply`` (and ``copy``). One query per step, none per job."""
    reusing = [j for j in claimed if j.reuse_seconds is not None and j.request_sha256 is not None]
    decided = Decided()
    if not reusing:
        return decided
    keys = sorted({(j.tenant_id, j.request_sha256) for j in reusing if j.request_sha256 is not None})
    job_rows.lock_requests(session, keys)
    # Running first, answers second: each statement sees what was committed when it began, and
    # an identical call's store may commit between the two. Read the other way round, a call
    # stored in between is neither an answer yet nor running any more, and the job would call
    # again; this way round it is one or the other.
    running = job_rows.running_requests(session, keys, exclude=[j.id for j in claimed])
    answers = job_rows.newest_answers(session, [j.id for j in reusing])
    # Jobs of this claim that call: without reuse, they call whatever; with it, the first of each
    # request that finds no answer and nothing running.
    calling = {(j.tenant_id, j.request_sha256) for j in claimed if j.reuse_seconds is None}
    for job in sorted(reusing, key=lambda j: j.id):
        key = (job.tenant_id, job.request_sha256)
        answer = answers.get(job.id)
        assert job.reuse_seconds is not None
        if answer is not None and answer.called_at >= now - timedelta(seconds=job.reuse_seconds):
            decided.reused.append((job, answer.origin))
        elif key in running:
            ran = max((now - running[key]).total_seconds(), 0.0)
            wait = min(max(WAIT_SECONDS, ran / 2), MAX_WAIT_SECONDS)
            decided.waiting[job.id] = now + timedelta(seconds=wait)
        elif key in calling:
            decided.waiting[job.id] = now + timedelta(seconds=WAIT_SECONDS)
        else:
            calling.add(key)
    return decided


def apply(session: Session, decided: Decided, *, now: datetime) -> None:
    """Store the decisions' statuses: the waiting jobs queued again (their claims' attempts
    undone), the reusing ones succeeded. Their answers are copied by ``copy``, after the caller
    (pcq.jobs.lifecycle) has written their webhook events with the claim's other ended jobs:
    those lock their batches' rows, which must come before the copy's batch_domains rows."""
    if decided.waiting:
        job_rows.wait_for_identical(session, decided.waiting, now=now)
    if decided.reused:
        job_rows.end_claimed(
            session, [job.id for job, _ in decided.reused], status=JobStatus.SUCCEEDED, now=now
        )


def copy(session: Session, decided: Decided, *, now: datetime) -> None:
    """Store the reusing jobs' copies of their answers (``apply`` has stored them succeeded)."""
    if decided.reused:
        result_rows.copy_answers(session, [(job.id, origin) for job, origin in decided.reused], now=now)
