"""Tables of the two baselines, shaped like pcq's ``results`` and ``citations``.

Same columns and types, and the same indexes on the citation rows (a unique position index
and the three per-tenant lookup indexes), so PostgreSQL maintains as much per stored row as
it does for pcq. No foreign keys: the ceiling has no jobs table to point at.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB


def bench_tables(prefix: str, metadata: MetaData | None = None) -> tuple[MetaData, Table, Table]:
    md = metadata or MetaData()
    results = Table(
        f"{prefix}_results",
        md,
        Column("job_id", String(40), primary_key=True),
        Column("attempt_number", Integer, nullable=False),
        Column("raw_body", Text, nullable=False),
        Column("content", Text),
        Column("parsed", JSONB),
        Column("model", String(64)),
        Column("finish_reason", String(32)),
        Column("upstream_id", String(128)),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("total_tokens", Integer),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    citations = Table(
        f"{prefix}_citations",
        md,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("tenant_id", String(40), nullable=False),
        Column("job_id", String(40), nullable=False),
        Column("batch_id", String(40)),
        Column("field", Text, nullable=False),
        Column("field_position", Integer, nullable=False),
        Column("position", Integer, nullable=False),
        Column("url", Text, nullable=False),
        Column("domain", String(255)),
        Column("title", Text),
        Column("excerpts", JSONB),
        Column("reasoning", Text),
        Column("confidence", String(32)),
    )
    Index(
        f"ix_{prefix}_cit_job_pos",
        citations.c.job_id,
        citations.c.field_position,
        citations.c.position,
        unique=True,
    )
    Index(f"ix_{prefix}_cit_domain", citations.c.tenant_id, citations.c.domain, citations.c.id)
    Index(f"ix_{prefix}_cit_url", citations.c.tenant_id, citations.c.url, citations.c.id)
    Index(f"ix_{prefix}_cit_batch", citations.c.tenant_id, citations.c.batch_id, citations.c.id)
    return md, results, citations


def domain_of(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower() if host else None


def rows_for(
    job_id: str, body: str, data: dict[str, Any], now: Any, tenant: str, batch: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The result row and the citation rows of one parsed chat-completion answer."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    result = {
        "job_id": job_id,
        "attempt_number": 1,
        "raw_body": body,
        "content": message.get("content"),
        "parsed": None,
        "model": data.get("model"),
        "finish_reason": choice.get("finish_reason"),
        "upstream_id": data.get("id"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "created_at": now,
    }
    cites = [
        {
            "tenant_id": tenant,
            "job_id": job_id,
            "batch_id": batch,
            "field": basis.get("field"),
            "field_position": fpos,
            "position": cpos,
            "url": cite.get("url"),
            "domain": domain_of(cite.get("url") or ""),
            "title": cite.get("title"),
            "excerpts": cite.get("excerpts"),
            "reasoning": basis.get("reasoning"),
            "confidence": basis.get("confidence"),
        }
        for fpos, basis in enumerate(data.get("basis") or [])
        for cpos, cite in enumerate(basis.get("citations") or [])
    ]
    return result, cites


def request_for(i: int) -> dict[str, Any]:
    """The i-th benchmark request, the same for pcq and both baselines."""
    models = ("lite", "base", "core")
    return {"model": models[i % 3], "messages": [{"role": "user", "content": f"bench question {i}"}]}
