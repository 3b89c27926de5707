"""What the read-only console (``/console``, api.routes.console) shows: its pages' data, read
through the same services and views as the API's routes (a batch as ``GET /v1/batches/{id}``
shows it, a job as ``GET /v1/jobs/{id}``), plus the few reads only the console has (a tenant's
batches, a job's attempts, a tenant's domains) from pcq.repositories. Scoped to the tenant:
another tenant's batch or job is NotFound (a 404 page), as in the API."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api import service
from pcq import views
from pcq.jobs.errors import InvalidInput
from pcq.models import TERMINAL_STATUSES, Attempt
from pcq.repositories import batches as batch_rows
from pcq.repositories import jobs as job_rows
from pcq.repositories import results as result_rows
from pcq.repositories.jobs import ExportJob
from pcq.repositories.results import CitationFilter, DomainCount
from pcq.views import BatchOut, JobOut

BATCHES_PAGE = 25
JOBS_PAGE = 50
DOMAINS_SHOWN = 200  # the console lists the most cited domains; the API pages through all
CITATIONS_PAGE = 50
MAX_DOMAIN_CHARS = 255  # as GET /v1/citations?domain= (and the column)


def ended(batch: BatchOut) -> int:
    """Jobs of the batch that have ended, whatever their outcome: what its progress bar shows."""
    return sum(batch.counts[s] for s in TERMINAL_STATUSES)


def list_batches(session: Session, tenant_id: str, cursor: str | None) -> tuple[list[BatchOut], str | None]:
    """A page of the tenant's batches, newest first, each with its counts (one query for the
    counts of the whole page)."""
    before = service.decode_cursor(cursor) if cursor is not None else None
    rows = batch_rows.newest_first(session, tenant_id, before=before, limit=BATCHES_PAGE + 1)
    page = rows[:BATCHES_PAGE]
    pairs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for batch_id, status, n in job_rows.status_counts_of_batches(session, [b.id for b in page]):
        pairs[batch_id].append((status, n))
    shown = [views.batch_out(b, views.all_counts(pairs[b.id])) for b in page]
    more = len(rows) > BATCHES_PAGE
    return shown, service.encode_cursor(page[-1].id) if more and page else None


@dataclass
class BatchPage:
    batch: BatchOut
    jobs: Sequence[ExportJob]  # id, custom_id, status, error, error_code; in submission order
    next_cursor: str | None
    domains: list[DomainCount]  # the most cited


def batch_page(session: Session, tenant_id: str, batch_id: str, cursor: str | None) -> BatchPage:
    batch = service.get_batch(session, tenant_id, batch_id)
    out = views.batch_out(batch, service.batch_counts(session, batch.id))
    after = service.decode_cursor(cursor) if cursor is not None else ""
    rows = job_rows.page_of_batch(session, batch.id, after=after, limit=JOBS_PAGE + 1)
    jobs = rows[:JOBS_PAGE]
    more = len(rows) > JOBS_PAGE
    domains, _ = service.batch_domains(session, tenant_id, batch.id, cursor=None, limit=10)
    return BatchPage(out, jobs, service.encode_cursor(jobs[-1][0]) if more and jobs else None, domains)


@dataclass
class CitedRow:
    """One citation of a job's answer, with the basis field it supports."""

    field: str
    confidence: str | None
    reasoning: str | None
    url: str
    title: str | None
    excerpts: list[str] | None


@dataclass
class JobPage:
    job: JobOut  # as GET /v1/jobs/{id} shows it, with its answer once it succeeded
    attempts: list[Attempt]
    citations: list[CitedRow]


def job_page(session: Session, tenant_id: str, job_id: str) -> JobPage:
    job = service.get_job(session, tenant_id, job_id)
    out = views.job_with_result(job, service.answers_of(session, job))
    cited = [
        CitedRow(b.field, b.confidence, b.reasoning, c.url, c.title, c.excerpts)
        for b in (out.result.basis if out.result else [])
        for c in b.citations
    ]
    return JobPage(out, result_rows.attempts_of(session, job.id), cited)


def domains(session: Session, tenant_id: str) -> list[DomainCount]:
    return result_rows.domains_of_tenant(session, tenant_id, limit=DOMAINS_SHOWN)


def citations_of_domain(
    session: Session, tenant_id: str, domain: str, cursor: str | None
) -> tuple[list[service.CitationWith], str | None]:
    """The audit rows of one domain (``GET /v1/citations?domain=``), oldest first."""
    if len(domain) > MAX_DOMAIN_CHARS:
        raise InvalidInput(f"a domain has at most {MAX_DOMAIN_CHARS} characters")
    return service.list_citations(
        session, tenant_id, CitationFilter(domain=domain), cursor=cursor, limit=CITATIONS_PAGE
    )
