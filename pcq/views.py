"""What a client is shown of a job and a batch: the response models and the functions that build
them from stored rows. Shared by the API (``GET /v1/jobs/{id}``, ``GET /v1/batches/{id}``) and
the worker's webhook deliveries, whose ``data`` is the job or batch exactly as those routes show
it. No queries here: the callers load (pcq.repositories), this module shapes."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, cast, get_args

from pydantic import BaseModel, Field

from pcq.models import TERMINAL_STATUSES, Batch, BatchStatus, Job, JobStatus, Priority
from pcq.repositories.results import Answers
from pcq.wire import KNOWN_MODELS

# Declared as enums in OpenAPI; the stored values stay plain strings.
Model = Literal["speed", "lite", "base", "core"]
assert get_args(Model) == KNOWN_MODELS


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class CitationOut(BaseModel):
    url: str
    title: str | None
    excerpts: list[str] | None


class BasisOut(BaseModel):
    field: str
    reasoning: str | None
    confidence: str | None
    citations: list[CitationOut]


class ResultOut(BaseModel):
    content: str | None
    parsed: Any | None
    model: str | None
    finish_reason: str | None
    usage: Usage | None
    basis: list[BasisOut]
    reused_from: str | None = Field(
        default=None,
        description='The job whose upstream call made this answer, when this job reused it ("reuse") '
        "instead of calling: no call, no cost. null: this job's own call made it",
    )


class JobOut(BaseModel):
    id: str
    object: str = "job"
    status: JobStatus
    custom_id: str | None
    batch_id: str | None
    metadata: dict[str, Any] | None
    model: Model
    priority: Priority = Field(description="high goes first within the tenant's share of the quota")
    attempts: int
    webhook_url: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    error: str | None = Field(description="A safe summary of why the job failed (or last retry)")
    error_code: str | None
    result: ResultOut | None = None


class BatchUsage(BaseModel):
    """Tokens summed over a batch's results (answers that reported no usage count 0)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BatchCost(BaseModel):
    """A batch's cost in USD (pcq/costs.py)."""

    estimated: float | None = Field(
        description="One call per job at its model's request price (PCQ_PRICES at submission): "
        "the cost with no retries; null for a batch submitted before costs were kept"
    )
    spent: float = Field(
        description="Every billed attempt of its jobs so far, retries included (a call that got "
        "an HTTP answer is billed), each at the prices when it was stored"
    )


class BatchOut(BaseModel):
    id: str
    object: str = "batch"
    status: BatchStatus = Field(description="completed once every job ended; queued while all are queued")
    total: int
    counts: dict[str, int]
    done: bool
    metadata: dict[str, Any] | None
    webhook_url: str | None
    webhook_events: list[str] | None = Field(
        default=None, description="Job events also sent to webhook_url (batch.completed always is)"
    )
    created_at: datetime
    retried: int | None = Field(default=None, description="Jobs requeued by retry-failed")
    position: int | None = Field(
        default=None,
        description="While none of its jobs has started (`GET /v1/batches/{id}` only): about how many "
        "jobs of other batches go before its first, in the current dispatch order; null once it runs",
    )
    max_cost: float | None = Field(
        default=None, description="USD: no call starts that could take `cost.spent` past it"
    )
    usage: BatchUsage | None = Field(
        default=None, description="`GET /v1/batches/{id}` and batch.completed only (not progress events)"
    )
    cost: BatchCost | None = Field(
        default=None, description="`GET /v1/batches/{id}` and batch.completed only (not progress events)"
    )


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    """Stored metadata text as the user gave it (json keeps key order and big integers)."""
    return None if text is None else cast(dict[str, Any], json.loads(text))


def job_out(job: Job, result: ResultOut | None = None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        custom_id=job.custom_id,
        batch_id=job.batch_id,
        metadata=parse_metadata(job.metadata_json),
        model=job.model,
        priority=Priority.of_rank(job.priority),
        attempts=job.attempts,
        webhook_url=job.webhook_url,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        next_attempt_at=job.next_attempt_at,
        error=job.error if job.status != JobStatus.SUCCEEDED else None,
        error_code=job.error_code if job.status != JobStatus.SUCCEEDED else None,
        result=result,
    )


def job_with_result(job: Job, answers: Answers | None) -> JobOut:
    """A job, with its answer when it succeeded (``answers``: those loaded for it)."""
    if answers is None:
        return job_out(job)
    return job_out(job, results_out(answers).get(job.id))


def results_out(answers: Answers) -> dict[str, ResultOut]:
    """The answer of each job in ``answers``, by job id."""
    cites: dict[tuple[str, int], list[CitationOut]] = defaultdict(list)
    for c in answers.citations:
        cites[(c.job_id, c.field_position)].append(CitationOut(url=c.url, title=c.title, excerpts=c.excerpts))
    basis: dict[str, list[BasisOut]] = defaultdict(list)
    for b in answers.basis:
        basis[b.job_id].append(
            BasisOut(
                field=b.field,
                reasoning=b.reasoning,
                confidence=b.confidence,
                citations=cites[(b.job_id, b.position)],
            )
        )
    out: dict[str, ResultOut] = {}
    for job_id, r in answers.results.items():
        u = answers.usage.get(job_id)
        out[job_id] = ResultOut(
            content=r.content,
            parsed=r.parsed,
            model=r.model,
            finish_reason=r.finish_reason,
            usage=Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
            )
            if u is not None
            else None,
            basis=basis.get(job_id, []),
            reused_from=r.reused_from,
        )
    return out


def all_counts(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """A batch's jobs per status, every status present, from (status, jobs) pairs."""
    counts: dict[str, int] = {s.value: 0 for s in JobStatus}
    for status, n in pairs:
        counts[status] = n
    return counts


def batch_done(counts: dict[str, int], total: int) -> bool:
    """Every job of the batch has ended."""
    return sum(counts[s] for s in TERMINAL_STATUSES) >= total


def batch_out(batch: Batch, counts: dict[str, int], retried: int | None = None) -> BatchOut:
    """A batch and its progress (``counts``: its jobs per status, every status present)."""
    done = batch_done(counts, batch.total)
    if done:
        status = BatchStatus.COMPLETED
    elif counts[JobStatus.QUEUED] == batch.total:
        status = BatchStatus.QUEUED
    else:
        status = BatchStatus.RUNNING
    return BatchOut(
        id=batch.id,
        status=status,
        total=batch.total,
        counts=counts,
        done=done,
        metadata=parse_metadata(batch.metadata_json),
        webhook_url=batch.webhook_url,
        webhook_events=json.loads(batch.webhook_events) if batch.webhook_events else None,
        created_at=batch.created_at,
        retried=retried,
        max_cost=batch.max_cost,
    )
