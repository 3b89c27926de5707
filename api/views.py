"""Responses built from stored rows: the models and rows pcq.repositories return, shown as the
schemas of api.schemas. No queries here: api.service loads, this module shapes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from api.schemas import CitationRow
from pcq.models import Citation, JobStatus
from pcq.repositories.jobs import ExportJob
from pcq.repositories.results import ExportAnswers

EXPORT_CHUNK_BYTES = 256 * 1024  # lines sent to the client per write (one thread hop each)


def export_lines(pages: Iterable[tuple[Sequence[ExportJob], ExportAnswers]]) -> Iterator[bytes]:
    """``GET /v1/batches/{id}/results``: one ExportLine per job, in the order given, as JSONL
    chunks of about EXPORT_CHUNK_BYTES.

    The hot path of an export, so built as dicts from row tuples and encoded by orjson, never
    as ORM objects or pydantic models: the same keys in the same order as ExportLine and
    ResultOut (tests compare every line with ``GET /v1/jobs/{id}``), and the stored JSON of
    ``parsed`` and of each citation's ``excerpts`` spliced in as its text (``orjson.Fragment``)
    instead of parsed and encoded again.
    """
    chunk: list[bytes] = []
    size = 0
    for jobs, answers in pages:
        succeeded = {job[0] for job in jobs if job[2] == JobStatus.SUCCEEDED}
        results = export_results(answers, succeeded)
        for job_id, custom_id, status, error, error_code in jobs:
            row: dict[str, Any] = {"custom_id": custom_id, "job_id": job_id, "status": status}
            if job_id in succeeded:
                row["result"] = results.get(job_id)
            elif error is not None:
                row["error"] = error
                row["error_code"] = error_code
            line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
            chunk.append(line)
            size += len(line)
            if size >= EXPORT_CHUNK_BYTES:
                yield b"".join(chunk)
                chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


def export_results(answers: ExportAnswers, job_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The answers of ``job_ids`` (rows of other jobs are skipped) as ResultOut shows them: dicts
    with ResultOut's keys in its order, by job id."""
    fragment = orjson.Fragment
    cites: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for job_id, field_position, url, title, excerpts in answers.citations:
        cite = {"url": url, "title": title, "excerpts": None if excerpts is None else fragment(excerpts)}
        key = (job_id, field_position)
        if key in cites:
            cites[key].append(cite)
        else:
            cites[key] = [cite]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for job_id, position, field, reasoning, confidence in answers.basis:
        if job_id not in job_ids:
            continue
        entry = {
            "field": field,
            "reasoning": reasoning,
            "confidence": confidence,
            "citations": cites.get((job_id, position), []),
        }
        if job_id in by_job:
            by_job[job_id].append(entry)
        else:
            by_job[job_id] = [entry]
    out: dict[str, dict[str, Any]] = {}
    for (
        job_id,
        content,
        parsed,
        model,
        finish,
        usage,
        prompt,
        completion,
        total,
        reused,
        basis,
    ) in answers.results:
        if job_id not in job_ids:
            continue
        out[job_id] = {
            "content": content,
            "parsed": None if parsed is None else fragment(parsed),
            "model": model,
            "finish_reason": finish,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
            if usage
            else None,
            "basis": by_job.get(job_id, []) if basis is None else fragment(basis),
            "reused_from": reused,
        }
    return out


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
