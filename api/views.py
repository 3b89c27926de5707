"""Responses built from stored rows: the models and rows pcq.repositories return, shown as the
schemas of api.schemas. No queries here: api.service loads, this module shapes."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, cast

from api.schemas import BasisOut, BatchOut, CitationOut, CitationRow, JobOut, ResultOut, Usage
from pcq.models import TERMINAL_STATUSES, Batch, BatchStatus, Citation, Job, JobStatus
from pcq.repositories.results import Answers


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
        )
    return out


def export_rows(chunks: Iterable[tuple[list[Job], Answers]]) -> Iterator[dict[str, Any]]:
    """One line of ``GET /v1/batches/{id}/results`` (an ExportLine) per job, in the order given."""
    for jobs, answers in chunks:
        results = results_out(answers)
        for job in jobs:
            row: dict[str, Any] = {
                "custom_id": job.custom_id,
                "job_id": job.id,
                "status": job.status,
            }
            if job.status == JobStatus.SUCCEEDED:
                res = results.get(job.id)
                row["result"] = res.model_dump(mode="json") if res else None
            elif job.error is not None:
                row["error"] = job.error
                row["error_code"] = job.error_code
            yield row


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
        created_at=batch.created_at,
        retried=retried,
    )


def citation_row(
    citation: Citation, custom_id: str | None, reasoning: str | None, confidence: str | None
) -> CitationRow:
    return CitationRow(
        id=citation.id,
        job_id=citation.job_id,
        custom_id=custom_id,
        batch_id=citation.batch_id,
        field=citation.field,
        position=citation.position,
        url=citation.url,
        domain=citation.domain,
        title=citation.title,
        excerpts=citation.excerpts,
        reasoning=reasoning,
        confidence=confidence,
    )
