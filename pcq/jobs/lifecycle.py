"""The rules of a job's life, in one place: which jobs may be claimed (``claimable``, shared
by the claim and the sweep), how a call's outcome settles its job (``settle``: success, a retry
after a backoff or exactly Retry-After, failure), when its attempts are exhausted and when a
worker death makes it a suspect, and how outcomes are stored exactly once. The worker's
engine asks; this module decides. Statuses are ``pcq.models.JobStatus``.

Every outcome write is guarded by ``status='running' AND attempts=<the claimed attempt>``: a
second copy of a task, or a run whose lease was taken over, cannot store a result or move
the job, because a newer claim has bumped ``attempts`` (or cancel moved it out of
``running``). Claims and outcomes work on many jobs per statement: a worker's per-job cost
is a share of a few round trips, not a transaction of its own.

The statements are pcq.repositories' (``jobs``, ``results``: one UPDATE claims many jobs, COPY
stores the answers); this module decides what they do, with the conditions it passes them
(``claimable``), and runs them in its caller's transaction.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import ColumnElement, and_, case, or_
from sqlalchemy.orm import Session

from pcq import costs
from pcq.jobs import outbox, reuse
from pcq.models import BasisField, Citation, Job, JobStatus, Result, utcnow
from pcq.repositories import jobs as job_rows
from pcq.repositories import results as result_rows
from pcq.repositories.jobs import StatusChange
from pcq.wire import ParsedCompletion, needs_cleaning, storable

if TYPE_CHECKING:  # the API imports this module too, and needs no HTTP client
    from pcq.costs import Prices
    from pcq.settings import Settings
    from pcq.wire import Outcome

# Worker deaths (lease losses) are counted apart from attempts. A job whose worker died under it
# this many times is a *suspect*: it may be what kills workers, so each worker runs at most
# SUSPECT_LANE suspects at once. The first death is not enough: a worker that dies (OOM, a lost
# host) takes all its calls with it, and those overwhelmingly innocent jobs should re-run at
# full speed. A job that merely shared a worker with a poison job therefore dies with it at most
# twice, and after that never runs beside it again (both are suspects, one per worker).
SUSPECT_AFTER_LOSSES = 2
SUSPECT_LANE = 1


def crash_cap(max_attempts: int) -> int:
    """Worker deaths after which a job is failed: PCQ_MAX_ATTEMPTS, but never so few that an
    innocent job (at most SUSPECT_AFTER_LOSSES deaths beside a poison job) could reach it."""
    return max(max_attempts, SUSPECT_AFTER_LOSSES + 1)


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    tenant_id: str
    batch_id: str | None
    attempt: int  # this call's number: every claim ever made, so each call has its own row
    request_json: str  # the submitted request, verbatim: what the upstream receives
    attempts_base: int = 0  # claims made before the last manual retry
    lease_losses: int = 0  # claims since then that died with their worker
    model: str = ""  # the requested model (jobs.model): a metrics label, once bounded
    request_id: str | None = None  # X-Request-ID of the API request that submitted it (for logs)
    reuse_seconds: int | None = None  # "reuse": take an identical request's answer this recent
    request_sha256: str | None = None  # what finds an identical request (pcq.jobs.reuse)

    @property
    def tries(self) -> int:
        """Calls counted against PCQ_MAX_ATTEMPTS: those since the last manual retry, this one
        included, except the ones that died with their worker (counted by ``crash_cap``)."""
        return self.attempt - self.attempts_base - self.lease_losses

    @property
    def suspect(self) -> bool:
        return self.lease_losses >= SUSPECT_AFTER_LOSSES

    def exhausted(self, max_attempts: int) -> bool:
        """No further call after this one: a retryable failure now fails the job."""
        return self.tries >= max_attempts

    def log_fields(self) -> dict[str, Any]:
        """The ids a log line about this claim carries (pcq.logs.bind, or ``extra=``)."""
        return {
            "request_id": self.request_id,
            "tenant": self.tenant_id,
            "job_id": self.id,
            "batch_id": self.batch_id,
            "attempt": self.attempt,
        }


@dataclass
class Claimed:
    jobs: list[ClaimedJob]
    deferred: list[str]  # suspects left unclaimed because the worker's suspect lane was full
    # Jobs with "reuse" that make no call (pcq.jobs.reuse): succeeded with the answer of the job
    # given, or queued again to wait for an identical request's running call.
    reused: list[tuple[ClaimedJob, str]] = dataclass_field(default_factory=list)
    waiting: list[str] = dataclass_field(default_factory=list)


@dataclass(frozen=True)
class AttemptRecord:
    """What one upstream call did, whatever its outcome."""

    number: int
    started_at: datetime
    finished_at: datetime
    outcome: str  # ok | retryable | fatal
    error_class: str | None = None
    status_code: int | None = None
    upstream_request_id: str | None = None
    retry_after_seconds: float | None = None
    error_detail: str | None = None
    upstream_key_id: str | None = None
    cost: float = 0.0  # USD billed for the call, at the prices when it was settled (pcq/costs.py)

    def row(self, job_id: str) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "number": self.number,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "latency_ms": int((self.finished_at - self.started_at).total_seconds() * 1000),
            "outcome": self.outcome,
            "error_class": self.error_class,
            "status_code": self.status_code,
            "upstream_request_id": self.upstream_request_id,
            "retry_after_seconds": self.retry_after_seconds,
            "error_detail": storable(self.error_detail),
            "upstream_key_id": self.upstream_key_id,
            "cost": self.cost,
        }


@dataclass(frozen=True)
class Settled:
    """The outcome of one attempt, ready to store: success, retry at a time, or failure."""

    job: ClaimedJob
    record: AttemptRecord
    completion: ParsedCompletion | None = None  # set: succeeded
    retry_at: datetime | None = None  # set (and no completion): queued again
    code: str | None = None
    error: str | None = None


def backoff_seconds(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Retry-After when the upstream gave one, else capped exponential backoff with jitter."""
    if retry_after is not None:
        return retry_after + random.uniform(0, min(1.0, retry_after * 0.1))
    raw: float = min(base * (2 ** max(attempt - 1, 0)), cap)
    return float(raw * (1 - 0.25 * random.random()))


def settle(job: ClaimedJob, outcome: Outcome, settings: Settings, key_id: str | None = None) -> Settled:
    """Decide what a call's outcome does to its job: succeeded, queued again at a backoff (or
    exactly Retry-After), or failed; ``key_id`` is the upstream key that carried the call.
    Whether a retry is still allowed is decided when it is stored (``store_outcomes``), under
    the claim, with ``ClaimedJob.exhausted``. What the call cost is priced now
    (pcq.costs.attempt_cost), and stored with its attempt."""
    usage = outcome.completion.usage if outcome.completion is not None else None
    record = AttemptRecord(
        cost=costs.attempt_cost(settings.prices, job.model, outcome.status_code, usage),
        upstream_key_id=key_id,
        number=job.attempt,
        started_at=outcome.started_at,
        finished_at=outcome.finished_at,
        outcome=outcome.kind,
        error_class=outcome.error_class,
        status_code=outcome.status_code,
        upstream_request_id=outcome.upstream_request_id,
        retry_after_seconds=outcome.retry_after,
        error_detail=outcome.raw_error or outcome.summary,
    )
    if outcome.kind == "ok" and outcome.completion is not None:
        return Settled(job, record, completion=outcome.completion)
    code = outcome.error_class or "error"
    summary = outcome.summary or "upstream call failed"
    if outcome.kind == "retryable":
        delay = backoff_seconds(
            job.tries,
            settings.retry_base_seconds,
            settings.retry_max_seconds,
            outcome.retry_after,
        )
        return Settled(job, record, retry_at=utcnow() + timedelta(seconds=delay), code=code, error=summary)
    return Settled(job, record, code=code, error=summary)


def claimable(now: datetime) -> Any:
    """The one definition of a job a worker may take now, shared by the claim and the sweep:
    queued and due, or running under a lease that expired (its worker died)."""
    return or_(
        and_(Job.status == JobStatus.QUEUED, or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)),
        and_(Job.status == JobStatus.RUNNING, Job.lease_until < now),
    )


def _losses_after_claim() -> Any:
    """A ``running`` job being claimed has an expired lease: its last worker died under it."""
    return Job.lease_losses + case((Job.status == JobStatus.RUNNING, 1), else_=0)


def claim_many(
    session: Session,
    job_ids: list[str],
    *,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
    prices: Prices,
    suspect_room: int | None = None,
) -> Claimed:
    """Take the claimable jobs among ``job_ids`` for one attempt each, in one statement.

    Jobs not claimable (done, cancelled, leased by a live worker, retry not yet due) are
    skipped. A claim of a job whose lease expired counts a lease loss (its worker died). A job
    that lost ``crash_cap`` leases since its last manual retry is failed here, not run again;
    so is one whose calls since then (deaths aside) exceed ``max_attempts`` with no outcome.
    With ``suspect_room``, at most that many suspects are claimed; the others are ``deferred``.
    A job whose budget (its batch's max_cost, its tenant's monthly budget) has no room for its
    call at ``prices`` is not called: it ends ``cancelled`` (``budget_exceeded``), with the
    queued jobs of that budget that could no longer fit either (pcq.costs).
    A job with ``reuse`` may end here with an earlier answer, or wait for an identical call
    (pcq.jobs.reuse): either way it is not among the jobs returned to call.
    """
    if not job_ids:
        return Claimed([], [])
    deferred: list[str] = []
    # Fewer ids than the lane's room (one job at a time on an idle worker): no suspect can be
    # deferred, so the query that finds them is skipped.
    if suspect_room is not None and len(job_ids) > max(suspect_room, 0):
        suspects = job_rows.ids_among(
            session, job_ids, claimable(now), _losses_after_claim() >= SUSPECT_AFTER_LOSSES
        )
        deferred = suspects[max(suspect_room, 0) :]
        if deferred:
            skip = set(deferred)
            job_ids = [i for i in job_ids if i not in skip]
    rows = job_rows.claim(
        session,
        job_ids,
        claimable=claimable(now),
        lease_losses=_losses_after_claim(),
        now=now,
        lease_until=now + timedelta(seconds=lease_seconds),
    )
    claimed: list[ClaimedJob] = []
    give_up: list[tuple[ClaimedJob, str, datetime | None, str | None, str | None]] = []
    for row in rows:
        job = ClaimedJob(
            row.id,
            row.tenant_id,
            row.batch_id,
            row.attempts,
            row.request_json,
            row.attempts_base,
            row.lease_losses,
            row.model,
            row.request_id,
            row.reuse_seconds,
            row.request_sha256,
        )
        cap = crash_cap(max_attempts)
        if job.lease_losses >= cap:
            reason = f"its worker died during each of its last {cap} runs (it may be what kills workers)"
            give_up.append((job, JobStatus.FAILED, None, "attempts_exhausted", f"gave up: {reason}"))
        elif job.tries > max_attempts:
            reason = f"gave up after {max_attempts} attempts that did not complete"
            give_up.append((job, JobStatus.FAILED, None, "attempts_exhausted", reason))
        else:
            claimed.append(job)
    # Before any webhook event is written: reuse's locks come first in the transaction, then
    # the budgets' (pcq.costs), which are asked only about the jobs that would call (a reused
    # answer costs nothing); every job claimed here is still ``running``, and none of those
    # that make no call (reused, waiting, given up) may count as a call in flight.
    decided = reuse.decide(session, claimed, now=now)
    skipped = decided.skipped()
    calls = [j for j in claimed if j.id not in skipped] if skipped else claimed
    calling = {j.id for j in calls}
    refused = _refuse_over_budget(
        session, [r for r in rows if r.id in calling], prices, now, claimed_ids=[r.id for r in rows]
    )
    if refused:
        calls = [j for j in calls if j.id not in refused]
    # Locks in the order every writer takes them (store_outcomes: jobs, the batch rows its
    # webhook events lock, batch_domains, then the spend counters), or a claim and a store
    # could each wait for the other: the job rows (claimed above), then the events of the
    # jobs this claim ended (their batch rows), and only then the reused answers' copies
    # (their batches' batch_domains rows). The reused jobs are stored succeeded first, so the
    # event that completes their batch sees them ended.
    reuse.apply(session, decided, now=now)
    _set_status(session, give_up, now, reused=[job.id for job, _ in decided.reused])
    reuse.copy(session, decided, now=now)
    return Claimed(calls, deferred, decided.reused, list(decided.waiting))


def _refuse_over_budget(
    session: Session, rows: Any, prices: Prices, now: datetime, *, claimed_ids: list[str]
) -> set[str]:
    """Cancel the jobs just claimed (``rows``: those that would call, of ``claimed_ids``, all
    this claim took) whose budget has no room for their call, and (up to
    ``costs.CANCEL_AT_ONCE`` per budget) the queued jobs of those budgets that could no longer
    fit; their webhook events are written as a user's cancel writes them. Returns the claimed
    ids cancelled."""
    refused, exhausted = costs.refuse_over_budget(
        session, list(rows), prices, now=now, claimed_ids=claimed_ids
    )
    if not refused:
        return set()
    for reason in sorted(set(refused.values())):
        ids = [job_id for job_id, why in refused.items() if why == reason]
        job_rows.end_claimed(
            session, ids, status=JobStatus.CANCELLED, now=now, code=costs.BUDGET_EXCEEDED, error=reason
        )
    ended = list(refused)
    for scope in exhausted:
        ended += job_rows.cancel_queued(
            session,
            batch_id=scope.batch_id,
            tenant_id=scope.tenant_id,
            models=scope.models,
            now=now,
            code=costs.BUDGET_EXCEEDED,
            error=costs.REASONS[costs.BATCH if scope.batch_id is not None else costs.TENANT],
            limit=costs.CANCEL_AT_ONCE,
        )
    outbox.record_finished(session, [(job_id, JobStatus.CANCELLED) for job_id in ended], now=now)
    return set(refused)


def renew_leases(
    session: Session, claims: list[tuple[str, int]], *, now: datetime, lease_seconds: float
) -> int:
    """Extend the leases of calls still running here, so no sweeper takes them over.

    ``claims`` are (job id, attempt) pairs: a claim that was taken over meanwhile renews
    nothing, so it cannot keep alive a newer claim whose worker died.
    """
    if not claims:
        return 0
    return job_rows.renew_leases(session, claims, lease_until=now + timedelta(seconds=lease_seconds))


def release(session: Session, claims: list[tuple[str, int]], *, now: datetime) -> int:
    """Hand back the jobs of (job id, attempt) claims this worker gives up as it shuts down:
    ``queued`` and unsent, so the dispatcher sends them again at once. Not a lease loss: the worker
    did not die, so the job is not a suspect; its call (if it was made) counts as an attempt."""
    if not claims:
        return 0
    return job_rows.release(session, claims, now=now)


def unclaim(session: Session, job: ClaimedJob, *, now: datetime, retry_at: datetime) -> bool:
    """Give a claim back unused (no upstream call was made): the attempt does not count."""
    return job_rows.unclaim(session, job.id, job.attempt, now=now, retry_at=retry_at)


def _set_status(
    session: Session,
    changes: list[tuple[ClaimedJob, str, datetime | None, str | None, str | None]],
    now: datetime,
    *,
    reused: Sequence[str] = (),
) -> None:
    """Move owned jobs to their new status: (job, status, next_attempt_at, code, error). A
    queued job is not finished; any other status finishes it now, and writes its webhook events
    in this same transaction (pcq.jobs.outbox), as do the ``reused`` jobs (already stored
    succeeded by pcq.jobs.reuse): one outbox write, so its batch rows are locked once."""
    job_rows.set_statuses(
        session,
        [
            StatusChange(
                job.id, status, nxt, code, storable(error), None if status == JobStatus.QUEUED else now
            )
            for job, status, nxt, code, error in changes
        ],
        now=now,
    )
    finished = [(job.id, status) for job, status, *_ in changes if status != JobStatus.QUEUED]
    outbox.record_finished(session, finished + [(job_id, JobStatus.SUCCEEDED) for job_id in reused], now=now)


def _owned(session: Session, jobs: list[ClaimedJob]) -> set[str]:
    """Which of these claims still hold their job (their rows locked until commit)."""
    current = job_rows.running_attempts(session, [j.id for j in jobs])
    return {j.id for j in jobs if current.get(j.id) == j.attempt}


def store_outcomes(session: Session, items: list[Settled], *, max_attempts: int) -> set[str]:
    """Record every attempt, then store the outcome of each job this worker still owns.

    Returns the ids whose outcome was stored; the others lost their claim (taken over after
    a lease expired, or cancelled) and keep only their attempt row.
    """
    if not items:
        return set()
    result_rows.insert_attempts(session, [i.record.row(i.job.id) for i in items])
    owned = _owned(session, [i.job for i in items])
    mine = [i for i in items if i.job.id in owned]
    now = max(i.record.finished_at for i in items)
    changes: list[tuple[ClaimedJob, str, datetime | None, str | None, str | None]] = []
    successes: list[Settled] = []
    for i in mine:
        if i.completion is not None:
            changes.append((i.job, JobStatus.SUCCEEDED, None, None, None))
            successes.append(i)
        elif i.retry_at is not None and not i.job.exhausted(max_attempts):
            changes.append((i.job, JobStatus.QUEUED, i.retry_at, i.code, i.error))
        elif i.retry_at is not None:
            changes.append(
                (i.job, JobStatus.FAILED, None, i.code, f"{i.error} (gave up after {i.job.tries} attempts)")
            )
        else:
            changes.append((i.job, JobStatus.FAILED, None, i.code, i.error))
    _set_status(session, changes, now)
    _store_completions(session, successes)
    # Every call recorded is counted, its claim lost or not: it was billed all the same.
    costs.record_spend(
        session,
        [costs.Spend(i.job.tenant_id, i.job.batch_id, i.record.cost, i.record.finished_at) for i in items],
    )
    return owned


@dataclass
class AnswerRows:
    """The rows that store answers, per table, as the writer inserts them (``insert_answers``
    keywords); the benchmarks seed with it too, so they write what the worker writes."""

    results: list[dict[str, Any]] = dataclass_field(default_factory=list)
    usage: list[dict[str, Any]] = dataclass_field(default_factory=list)
    basis: list[dict[str, Any]] = dataclass_field(default_factory=list)
    citations: list[dict[str, Any]] = dataclass_field(default_factory=list)

    def add(self, job: ClaimedJob, c: ParsedCompletion, at: datetime) -> None:
        """The rows of one job's answer, stored at ``at``."""
        self.results.append(
            {
                "job_id": job.id,
                "attempt_number": job.attempt,
                "raw_body": c.raw_body,
                "content": c.content,
                "parsed": c.parsed,
                "model": _fit(c.model, MODEL_CHARS),
                "finish_reason": _fit(c.finish_reason, FINISH_REASON_CHARS),
                "upstream_id": _fit(c.upstream_id, UPSTREAM_ID_CHARS),
                "created_at": at,
            }
        )
        if c.usage is not None:
            self.usage.append(
                {
                    "job_id": job.id,
                    "prompt_tokens": _int(c.usage.get("prompt_tokens")),
                    "completion_tokens": _int(c.usage.get("completion_tokens")),
                    "total_tokens": _int(c.usage.get("total_tokens")),
                    "details": c.usage,
                }
            )
        for pos, basis in enumerate(c.basis):
            confidence = _fit(basis.confidence, CONFIDENCE_CHARS)
            self.basis.append(
                {
                    "job_id": job.id,
                    "position": pos,
                    "field": basis.field,
                    "reasoning": basis.reasoning,
                    "confidence": confidence,
                }
            )
            self.citations.extend(
                {
                    "tenant_id": job.tenant_id,
                    "job_id": job.id,
                    "batch_id": job.batch_id,
                    "field": basis.field,
                    "field_position": pos,
                    "position": cpos,
                    "url": cite.url,
                    "domain": _fit(cite.domain, DOMAIN_CHARS),
                    "title": cite.title,
                    "excerpts": cite.excerpts,
                    # Copies for the audit filters (pcq.models.result.Citation)
                    "confidence": confidence,
                    "created_at": at,
                }
                for cpos, cite in enumerate(basis.citations)
            )


def _store_completions(session: Session, items: list[Settled]) -> None:
    """The rows of the succeeded jobs' answers; those of an answer with characters no column
    can hold (NUL, unpaired surrogates) cleaned first (pcq.wire.storable)."""
    rows = AnswerRows()
    for i in items:
        assert i.completion is not None
        rows.add(i.job, i.completion, i.record.finished_at)
    dirty = {i.job.id for i in items if i.completion is not None and needs_cleaning(i.completion.raw_body)}

    def clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [storable(r) if r["job_id"] in dirty else r for r in rows] if dirty else rows

    result_rows.insert_answers(
        session,
        results=clean(rows.results),
        usage=clean(rows.usage),
        basis=clean(rows.basis),
        citations=clean(rows.citations),
    )


def _width(column: Any) -> int:
    width: int = column.type.length
    return width


# The widths of the columns that hold upstream strings, read once (an ORM attribute costs a few
# microseconds a read, and the writer asks for each citation).
MODEL_CHARS = _width(Result.model)
FINISH_REASON_CHARS = _width(Result.finish_reason)
UPSTREAM_ID_CHARS = _width(Result.upstream_id)
CONFIDENCE_CHARS = min(_width(BasisField.confidence), _width(Citation.confidence))
DOMAIN_CHARS = _width(Citation.domain)


def _fit(value: str | None, width: int) -> str | None:
    """An upstream string cut to its column's width: PostgreSQL refuses a longer one, and one
    refused row fails the whole write batch. The raw body keeps the string whole."""
    return value[:width] if value is not None and len(value) > width else value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DueJob(NamedTuple):
    """A job the sweeper sends again, and why (a label of ``pcq_sweeper_resent_total``)."""

    id: str
    reason: str  # lease_expired | broker_lost | stale


def due_for_enqueue(
    session: Session,
    *,
    now: datetime,
    requeue_after_seconds: float,
    limit: int = 1000,
    resend_stale: bool = True,
    lost_before: datetime | None = None,
) -> list[DueJob]:
    """Jobs that need a message again, each with why: ``lease_expired`` (running, its worker
    died, never sent since), ``broker_lost`` (its message was sent before the broker lost its
    data), ``stale`` (its message was sent long ago and is presumed lost). (A job never sent, a
    first run or a retry, waits for the dispatcher: pcq.jobs.dispatch.)

    ``resend_stale=False`` leaves out jobs whose message was sent (and is merely old): the
    caller knows the broker still holds messages, so they are most likely waiting their turn.
    ``lost_before``: the broker lost its data (pcq/broker_epoch.py), so a message sent before
    this time counts as never sent, however young it is and whatever the queue holds.
    Marks the jobs as enqueued now, so that several sweepers do not all send them (on
    PostgreSQL, rows another sweeper is marking are skipped rather than sent twice).
    """
    # A queued job never sent is the dispatcher's (pcq.jobs.dispatch), not the sweep's: a NULL
    # enqueued_at compares as false below, and only a running job's expired lease is sent here.
    expired: ColumnElement[bool] = and_(Job.status == JobStatus.RUNNING, Job.enqueued_at.is_(None))
    unsent = expired
    # The reason, in the same statement: the first of the conditions below that holds.
    whens: list[tuple[ColumnElement[bool], str]] = []
    if lost_before is not None:
        lost = Job.enqueued_at < lost_before
        unsent = or_(unsent, lost)
        whens.append((lost, "broker_lost"))
    whens.append((expired, "lease_expired"))
    if resend_stale:
        unsent = or_(unsent, Job.enqueued_at < now - timedelta(seconds=requeue_after_seconds))
    reason = case(*whens, else_="stale")
    rows = job_rows.take_for_enqueue(session, and_(claimable(now), unsent), reason, now=now, limit=limit)
    return [DueJob(job_id, why) for job_id, why in rows]


def defer(session: Session, job_ids: list[str], *, until: datetime) -> None:
    """Suspects a worker left unclaimed (its lane was busy): unsent, and not due before
    ``until``, so the dispatcher does not hand them straight back to the same busy lane (nor
    take each pass's share of their batch for them)."""
    job_rows.defer(session, job_ids, until=until)


def clear_enqueued(session: Session, job_ids: list[str]) -> None:
    """Messages for these jobs could not be sent: let the next sweep send them (1,000 ids a
    statement, however many a batch had)."""
    job_rows.clear_enqueued(session, job_ids)
