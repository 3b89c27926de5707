"""Audit queries: ``GET /v1/citations`` filters and ``GET /v1/batches/{id}/domains``, on SQLite
and PostgreSQL, checked against a brute-force reading of the same rows.

One small dataset per database, stored through the worker's own writer
(``pcq.repositories.results.insert_answers``, COPY on PostgreSQL): two tenants, batches that
share custom_ids, single jobs, fields and URLs longer than a btree entry holds, confidences
and times. The expected answer of a filter is computed in Python from the source rows (the
job's custom_id, the basis field's confidence, the result's time), not from the copies the
queries read, so the copies are checked too.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from api.app import create_app
from migrations.migrate import upgrade_to_head
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.models import BasisField, Batch, Citation, Job, Result, Tenant
from pcq.repositories import results as result_rows
from pcq.tenants import create_key_at
from tests.conftest import make_settings

LONG_FIELD = "f" * 3000  # over a PostgreSQL btree entry's 2,704 bytes: indexed by md5
LONG_URL = "https://long.example/" + "p" * 3000
FIELDS = ["output", "name", "ceo", LONG_FIELD]
CONFIDENCES = ["low", "high", None]
URLS = [
    "https://a.example/1",
    "https://a.example/2",
    "https://www.b.example/x",
    "https://C.example/y",
    "urn:no-host",
    LONG_URL,
]
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    """A citation as the truth has it: what each filter compares."""

    id: int
    tenant: str
    job_id: str
    batch_id: str | None
    custom_id: str | None
    domain: str | None
    url: str
    field: str
    confidence: str | None
    created_at: datetime
    field_md5: str | None


@dataclass
class Audit:
    client: TestClient
    keys: dict[str, str]  # tenant name -> key
    rows: list[Row]
    jobs: dict[str, str]  # job id -> tenant name
    batches: dict[str, str]  # batch id -> tenant name

    def h(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def pages(
        self, path: str, params: dict[str, Any], limit: int, tenant: str = "acme"
    ) -> list[dict[str, Any]]:
        """Every row, following next_cursor; each page at most ``limit`` rows."""
        out: list[dict[str, Any]] = []
        cursor = None
        for _ in range(1000):
            page = (
                {**params, "limit": limit} if cursor is None else {**params, "limit": limit, "cursor": cursor}
            )
            r = self.client.get(path, params=page, headers=self.h(tenant))
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["data"]) <= limit
            out += body["data"]
            cursor = body["next_cursor"]
            if cursor is None:
                return out
            assert body["data"], "a next_cursor after an empty page"
        raise AssertionError("pages never ended")


def seed(db_url: str, rng: random.Random) -> tuple[list[Row], dict[str, str], dict[str, str]]:
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    with sessions() as s:
        tenant_of = {t.name: t.id for t in s.scalars(select(Tenant))}
    jobs: dict[str, str] = {}
    batches: dict[str, str] = {}
    plan = [
        ("acme", "bat_a1", 4),
        ("acme", "bat_a2", 3),
        ("acme", None, 3),
        ("globex", "bat_g1", 2),
        ("globex", None, 1),
    ]
    with unit_of_work(sessions) as s:
        n = 0
        for tenant, batch, size in plan:
            if batch is not None:
                s.add(Batch(id=batch, tenant_id=tenant_of[tenant], total=size, created_at=T0))
                s.flush()
                batches[batch] = tenant
            for i in range(size):
                n += 1
                job_id = f"job_{n:04d}"
                custom = f"c{i}" if batch is not None else (f"s{n}" if n % 2 else None)
                s.add(
                    Job(
                        id=job_id,
                        tenant_id=tenant_of[tenant],
                        batch_id=batch,
                        custom_id=custom,
                        request_json="{}",
                        model="lite",
                        status="succeeded",
                        created_at=T0,
                        updated_at=T0,
                    )
                )
                jobs[job_id] = tenant
        s.flush()
        results, basis, cites = [], [], []
        for k, (job_id, tenant) in enumerate(sorted(jobs.items())):
            job = s.get(Job, job_id)
            assert job is not None
            stored = T0 + timedelta(minutes=k % 4, microseconds=(k // 4) % 2)  # some jobs share a time
            results.append({"job_id": job_id, "attempt_number": 1, "raw_body": "{}", "created_at": stored})
            for pos, fld in enumerate(rng.sample(FIELDS, rng.randint(1, 2))):
                conf = rng.choice(CONFIDENCES)
                basis.append(
                    {"job_id": job_id, "position": pos, "field": fld, "reasoning": "r", "confidence": conf}
                )
                for cpos in range(rng.randint(0, 4)):
                    url = rng.choice(URLS)
                    host = url.split("/")[2].lower() if "//" in url else None
                    cites.append(
                        {
                            "tenant_id": tenant_of[tenant],
                            "job_id": job_id,
                            "batch_id": job.batch_id,
                            "field": fld,
                            "field_position": pos,
                            "position": cpos,
                            "url": url,
                            "domain": host,
                            "title": None,
                            "excerpts": None,
                            "confidence": conf,
                            "created_at": stored,
                        }
                    )
        result_rows.insert_answers(s, results=results, usage=[], basis=basis, citations=cites)
    name_of = {v: k for k, v in tenant_of.items()}
    with sessions() as s:
        truth = s.execute(
            select(Citation, Job.custom_id, BasisField.confidence, Result.created_at)
            .join(Job, Job.id == Citation.job_id)
            .join(
                BasisField,
                (BasisField.job_id == Citation.job_id) & (BasisField.position == Citation.field_position),
            )
            .join(Result, Result.job_id == Citation.job_id)
        ).all()
        rows = [
            Row(
                c.id,
                name_of[c.tenant_id],
                c.job_id,
                c.batch_id,
                custom,
                c.domain,
                c.url,
                c.field,
                conf,
                when,
                c.field_md5,
            )
            for c, custom, conf, when in truth
        ]
    engine.dispose()
    return rows, jobs, batches


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def audit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    if request.param == "sqlite":
        db_url = f"sqlite:///{Path(tmp_path_factory.mktemp('audit')) / 'pcq.sqlite3'}"
        upgrade_to_head(db_url)
    else:
        db_url = request.getfixturevalue("module_pg_url")
    settings_ = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings_)) as client:
        keys = {name: create_key_at(db_url, name) for name in ("acme", "globex")}
        rows, jobs, batches = seed(db_url, random.Random(7))
        yield Audit(client, keys, rows, jobs, batches)


def expected(a: Audit, tenant: str, f: dict[str, Any]) -> list[int]:
    def when(value: str) -> datetime:
        t = datetime.fromisoformat(value)
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t

    keep = []
    for r in a.rows:
        checks = [
            r.tenant == tenant,
            "job_id" not in f or r.job_id == f["job_id"],
            "batch_id" not in f or r.batch_id == f["batch_id"],
            "custom_id" not in f or r.custom_id == f["custom_id"],
            "domain" not in f or r.domain == f["domain"].lower(),
            "url" not in f or r.url == f["url"],
            "field" not in f or r.field == f["field"],
            "confidence" not in f or r.confidence == f["confidence"],
            "created_after" not in f or r.created_at > when(f["created_after"]),
            "created_before" not in f or r.created_at < when(f["created_before"]),
        ]
        if all(checks):
            keep.append(r.id)
    return sorted(keep)


def test_the_dataset_has_what_the_filters_need(audit: Audit) -> None:
    mine = [r for r in audit.rows if r.tenant == "acme"]
    assert len(mine) > 20
    assert any(r.field == LONG_FIELD for r in mine)
    assert any(r.url == LONG_URL for r in mine)
    assert len({r.batch_id for r in mine if r.custom_id == "c0"}) == 2  # one custom_id, two batches
    assert {r.confidence for r in mine} == set(CONFIDENCES)
    assert any(r.domain is None for r in mine)
    assert len({r.created_at for r in mine}) < len({r.job_id for r in mine})  # jobs share a time


def _times(a: Audit) -> list[str]:
    """Stored times (exact bounds), a second and a microsecond off, in another zone."""
    out = []
    for t in sorted({r.created_at for r in a.rows})[:6]:
        out += [
            t.isoformat(),
            (t + timedelta(seconds=1)).isoformat(),
            (t - timedelta(microseconds=1)).isoformat(),
            t.astimezone(timezone(timedelta(hours=2))).isoformat(),
        ]
    return out


@st.composite
def filters(draw: st.DrawFn, a: Audit) -> dict[str, Any]:
    mine = [r for r in a.rows if r.tenant == "acme"]
    pools: dict[str, list[Any]] = {
        "job_id": sorted({r.job_id for r in mine}),
        "batch_id": sorted(b for b, t in a.batches.items() if t == "acme"),
        "custom_id": ["c0", "c1", "s1", "nope"],
        "domain": ["a.example", "WWW.B.EXAMPLE", "c.example", "long.example", "b.example"],
        "url": [*URLS, "https://a.example/3"],
        "field": [*FIELDS, "absent"],
        "confidence": ["low", "high", "medium"],
        "created_after": _times(a),
        "created_before": _times(a),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(pools)), max_size=3, unique=True))
    return {name: draw(st.sampled_from(pools[name])) for name in chosen}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_filter_and_combination_returns_exactly_its_rows_once_across_pages(
    audit: Audit, data: st.DataObject
) -> None:
    f = data.draw(filters(audit))
    limit = data.draw(st.integers(1, 7))
    got = audit.pages("/v1/citations", f, limit)
    ids = [row["id"] for row in got]
    assert ids == expected(audit, "acme", f)  # oldest first, each once, nothing missing
    for row in got:
        if "confidence" in f:
            assert row["confidence"] == f["confidence"]
        if "custom_id" in f:
            assert row["custom_id"] == f["custom_id"]


@pytest.mark.parametrize("probe", [1, 3, 10_000])
def test_a_time_window_returns_its_rows_whichever_way_it_is_read(
    audit: Audit, probe: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window holding most rows is read in id order, another from the time index (the choice
    is made on counts of at most WINDOW_PROBE entries: small probes here, so both ways run)."""
    monkeypatch.setattr(result_rows, "WINDOW_PROBE", probe)
    times = sorted({r.created_at for r in audit.rows})
    windows = [{"created_after": t.isoformat()} for t in times[:3]]
    windows += [{"created_before": t.isoformat()} for t in times[-3:]]
    windows.append({"created_after": times[0].isoformat(), "created_before": times[-1].isoformat()})
    windows.append({"created_after": (times[0] - timedelta(days=1)).isoformat()})
    for params in windows:
        for limit in (1, 4):
            got = [r["id"] for r in audit.pages("/v1/citations", params, limit)]
            assert got == expected(audit, "acme", params), params


@pytest.mark.parametrize(
    "params",
    [
        {"url": LONG_URL},
        {"field": LONG_FIELD},
        {"field": LONG_FIELD, "confidence": "low"},
        {"custom_id": "c0"},
        {"confidence": "high", "created_after": T0.isoformat()},
    ],
)
def test_named_filters_return_their_rows(audit: Audit, params: dict[str, str]) -> None:
    want = expected(audit, "acme", params)
    assert [r["id"] for r in audit.pages("/v1/citations", params, 1000)] == want


def test_no_filter_shows_only_the_tenants_own_citations(audit: Audit) -> None:
    for tenant in ("acme", "globex"):
        got = audit.pages("/v1/citations", {}, 5, tenant)
        assert [r["id"] for r in got] == expected(audit, tenant, {})
        assert {r["job_id"] for r in got} <= {j for j, t in audit.jobs.items() if t == tenant}


def test_a_filter_never_reaches_another_tenants_rows(audit: Audit) -> None:
    """Values globex's rows also have (custom_id c0, every domain) find only acme's."""
    for params in ({"custom_id": "c0"}, {"domain": "a.example"}, {"url": URLS[0]}, {"confidence": "low"}):
        got = audit.pages("/v1/citations", params, 50)
        assert got
        assert all(audit.jobs[r["job_id"]] == "acme" for r in got)
    theirs_job = next(j for j, t in audit.jobs.items() if t == "globex")
    theirs_batch = next(b for b, t in audit.batches.items() if t == "globex")
    assert (
        audit.client.get("/v1/citations", params={"job_id": theirs_job}, headers=audit.h()).status_code == 404
    )
    assert (
        audit.client.get("/v1/citations", params={"batch_id": theirs_batch}, headers=audit.h()).status_code
        == 404
    )


@pytest.mark.parametrize(
    "params",
    [
        {"created_after": "yesterday"},
        {"created_after": "1700000000"},  # Unix seconds: pydantic alone would take them
        {"created_after": "2026-11-23"},  # a date, no time
        {"created_after": "2026-11-23T00:00:00"},  # no zone
        {"created_after": "2026-02-30T00:00:00Z"},
        {"created_before": "2026-13-01"},
        {"created_after": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
        {"created_before": "9999-12-31T23:59:59-01:00"},  # after year 9999 in UTC
        {"created_after": ""},
        {"domain": "d" * 256},
        {"confidence": "c" * 33},
        {"custom_id": "c" * 256},
        {"job_id": "j" * 41},
        {"batch_id": "b" * 41},
        {"url": "https://e.example/" + "u" * 8192},
        {"field": "f" * 8193},
        {"field": ""},
        {"limit": "0"},
        {"limit": "1001"},
        {"cursor": "bm9wZQ"},  # "nope"
        {"cursor": "wrI"},  # "²": a digit to str.isdigit, not to int()
        {"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5"},  # beyond a 64-bit id
    ],
)
def test_bad_values_answer_422(audit: Audit, params: dict[str, str]) -> None:
    r = audit.client.get("/v1/citations", params=params, headers=audit.h())
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}


# --------------------------------------------------------------------------- /domains


def brute_domains(a: Audit, batch: str) -> list[dict[str, Any]]:
    cites: Counter[str | None] = Counter()
    jobs: defaultdict[str | None, set[str]] = defaultdict(set)
    for r in a.rows:
        if r.batch_id == batch:
            cites[r.domain] += 1
            jobs[r.domain].add(r.job_id)
    out = [{"domain": d, "citations": n, "jobs": len(jobs[d])} for d, n in cites.items()]
    return sorted(out, key=lambda x: (-x["citations"], x["domain"] or ""))


@pytest.mark.parametrize("limit", [1, 2, 100])
def test_domains_count_each_domains_citations_and_jobs_most_cited_first(audit: Audit, limit: int) -> None:
    for batch, tenant in audit.batches.items():
        got = audit.pages(f"/v1/batches/{batch}/domains", {}, limit, tenant)
        assert got == brute_domains(audit, batch)
        assert got, "every seeded batch cites something"


def test_domains_of_another_tenants_batch_or_an_unknown_one_answer_404(audit: Audit) -> None:
    theirs = next(b for b, t in audit.batches.items() if t == "globex")
    assert audit.client.get(f"/v1/batches/{theirs}/domains", headers=audit.h()).status_code == 404
    assert audit.client.get("/v1/batches/bat_nope/domains", headers=audit.h()).status_code == 404


@pytest.mark.parametrize(
    "params", [{"limit": "0"}, {"limit": "1001"}, {"cursor": "bm9wZQ"}, {"cursor": "wrI6YQ"}, {"cursor": ""}]
)
def test_domains_bad_values_answer_422(audit: Audit, params: dict[str, str]) -> None:
    batch = next(b for b, t in audit.batches.items() if t == "acme")
    r = audit.client.get(f"/v1/batches/{batch}/domains", params=params, headers=audit.h())
    assert r.status_code == 422, r.text


def test_fields_that_share_an_md5_still_page_exactly(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The field index holds md5(field); two fields with one md5 (made so here) both come from
    it, and the rows of the other are dropped and made up from the ids after them."""

    def colliding(text: str) -> str:
        return "0" * 32 if text in ("name", "ceo") else hashlib.md5(text.encode()).hexdigest()

    monkeypatch.setattr(result_rows, "text_md5", colliding)
    settings_ = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings_)) as client:
        keys = {name: create_key_at(db_url, name) for name in ("acme", "globex")}
        rows, jobs, batches = seed(db_url, random.Random(7))
        a = Audit(client, keys, rows, jobs, batches)
        for field in ("name", "ceo"):
            want = expected(a, "acme", {"field": field})
            assert want
            assert {r.field for r in a.rows if r.field_md5 == "0" * 32} == {"name", "ceo"}
            for limit in (1, 2, 5):
                assert [r["id"] for r in a.pages("/v1/citations", {"field": field}, limit)] == want
