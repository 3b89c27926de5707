"""Every SQL statement of the product, one module per aggregate: ``jobs`` (jobs, and the
statements of their life cycle), ``batches``, ``results`` (attempts, results, usage, basis and
citations), ``tenants`` (tenants and API keys), and ``bulk`` (PostgreSQL's COPY).

A repository runs statements and returns rows or models; it never commits nor rolls back. The
caller owns the transaction: a service of the API (``unit_of_work``, or the request's read
session), the job lifecycle (pcq.jobs.lifecycle, in the worker's transactions), the CLI. The
rules stay with the callers: where a statement depends on one (which jobs are claimable), the
caller passes it in as a SQL condition. tests/test_layout.py fails if a shipped module outside
this package builds a statement.
"""
