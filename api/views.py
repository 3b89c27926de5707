"""Responses built from stored rows: the models and rows pcq.repositories return, shown as the
schemas of api.schemas. No queries here: api.service loads, this module shapes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from api.schemas import CitationRow
from pcq.models import Citation, Job, JobStatus
from pcq.repositories.results import Answers
from pcq.views import batch_done, batch_out, job_out, job_with_result, parse_metadata, results_out

# Shown here too: the routes build every response through this module.
__all__ = ["batch_done", "batch_out", "job_out", "job_with_result", "parse_metadata", "results_out"]


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
