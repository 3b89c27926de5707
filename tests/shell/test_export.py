"""``pcq export`` in every format, against the real API (in process, on SQLite and PostgreSQL):
rows read back with csv, pyarrow and json say what ``GET /v1/jobs/{id}`` and
``GET /v1/citations`` say; and the clear errors."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.jobs.lifecycle import AttemptRecord
from pcq.models import utcnow
from pcq.tenants import create_key_at
from pcq.wire import BasisData, CitationData, ParsedCompletion, url_domain
from shell import cli
from shell.client import PcqClient
from shell.export import CITATION_COLUMNS, JOB_COLUMNS, PARQUET_MISSING, citation_domain
from shell.procs import free_port
from tests.conftest import make_settings
from tests.core import lifecycle_helpers as one

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}
JSON_COLUMNS = {c.name for c in (*JOB_COLUMNS, *CITATION_COLUMNS) if c.kind == "json"}
INT_COLUMNS = {c.name for c in (*JOB_COLUMNS, *CITATION_COLUMNS) if c.kind == "int"}


class _ViaTestClient(PcqClient):
    """The CLI's own client, its requests sent to the app in process."""

    def __init__(self, http: TestClient, key: str) -> None:
        http.headers["Authorization"] = f"Bearer {key}"
        self._http = http

    def close(self) -> None:
        pass


@dataclass
class Batch:
    http: TestClient
    key: str
    id: str

    def get(self, path: str) -> Any:
        r = self.http.get(path, headers={"Authorization": f"Bearer {self.key}"})
        assert r.status_code == 200, r.text
        return r.json()


def _record(n: int, outcome: str) -> AttemptRecord:
    now = utcnow()
    return AttemptRecord(number=n, started_at=now, finished_at=now, outcome=outcome)


def _answer(i: int) -> ParsedCompletion:
    parsed = {"name": f"n{i}", "n": i, "list": [1, {"x": None}]}
    return ParsedCompletion(
        raw_body="{}",
        content=json.dumps(parsed) + ' line\nbreak, "quote" \u2028',
        parsed=parsed,
        model="lite",
        finish_reason="stop",
        upstream_id=None,
        usage={"prompt_tokens": i, "completion_tokens": 10, "total_tokens": i + 10} if i != 2 else None,
        basis=[
            BasisData(
                field,
                f"why {field}",
                "medium",
                [
                    CitationData(
                        f"https://Docs{c}.Example.com/{field}/{i}", f"t{c}" if c else None, ["e1", "é2"]
                    )
                    for c in range(2)
                ],
            )
            for field in ("name", "n")
        ],
    )


@pytest.fixture
def batch(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Batch]:
    """5 jobs: 3 answered (one without usage), 1 failed, 1 queued; the CLI's client pointed at
    the app."""
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as http:
        key = create_key_at(db_url, "acme")
        body = {"requests": [{"custom_id": f"r{i}", "body": REQ} for i in range(5)]}
        r = http.post("/v1/batches", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202, r.text
        b = Batch(http, key, r.json()["id"])
        ids = {j["custom_id"]: j["id"] for j in b.get(f"/v1/jobs?batch_id={b.id}")["data"]}
        sessions = make_session_factory(make_engine(db_url))
        for i in range(4):
            with unit_of_work(sessions) as s:
                job = one.claim(s, ids[f"r{i}"], now=utcnow(), lease_seconds=60, max_attempts=3)
            assert job is not None
            with unit_of_work(sessions) as s:
                if i == 3:
                    one.store_failure(s, job, _record(job.attempt, "fatal"), code="bad_request", error="no")
                else:
                    assert one.store_success(s, job, _record(job.attempt, "ok"), _answer(i))
        monkeypatch.setattr(cli, "_client", lambda _args: _ViaTestClient(http, key))
        yield b


def _expected_rows(b: Batch) -> list[dict[str, Any]]:
    """What the schema says each job's row holds, from GET /v1/jobs/{id}."""
    out = []
    for line in b.http.get(
        f"/v1/batches/{b.id}/results", headers={"Authorization": f"Bearer {b.key}"}
    ).text.split("\n")[:-1]:
        job = b.get(f"/v1/jobs/{json.loads(line)['job_id']}")
        res = job["result"] or {}
        usage = res.get("usage")
        out.append(
            {
                "custom_id": job["custom_id"],
                "job_id": job["id"],
                "status": job["status"],
                "content": res.get("content"),
                "parsed": res.get("parsed"),
                "model": res.get("model"),
                "finish_reason": res.get("finish_reason"),
                "usage": usage,
                "prompt_tokens": usage["prompt_tokens"] if usage else None,
                "completion_tokens": usage["completion_tokens"] if usage else None,
                "total_tokens": usage["total_tokens"] if usage else None,
                "citation_count": sum(len(x["citations"]) for x in res.get("basis") or []),
                "error_code": job["error_code"],
                "error": job["error"],
                "reused_from": res.get("reused_from"),
            }
        )
    return out


def _expected_citations(b: Batch) -> list[dict[str, Any]]:
    """The batch's citation rows as GET /v1/citations has them (field_position: the basis order)."""
    rows = b.get(f"/v1/citations?batch_id={b.id}&limit=1000")["data"]
    fields: dict[str, list[str]] = {}
    for r in rows:
        if r["field"] not in fields.setdefault(r["job_id"], []):
            fields[r["job_id"]].append(r["field"])
    return [
        {
            **{
                k: r[k]
                for k in ("job_id", "custom_id", "field", "position", "url", "domain", "title", "excerpts")
            },
            **{"reasoning": r["reasoning"], "confidence": r["confidence"]},
            "field_position": fields[r["job_id"]].index(r["field"]),
        }
        for r in rows
    ]


def _from_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV cells back to values: JSON text parsed, numbers read, empty cells None."""
    out = []
    for row in rows:
        back: dict[str, Any] = {}
        for k, v in row.items():
            if v == "" or v is None:
                back[k] = None
            elif k in JSON_COLUMNS:
                back[k] = json.loads(v)
            elif k in INT_COLUMNS:
                back[k] = int(v)
            else:
                back[k] = v
        out.append(back)
    return out


def _read(path: Path, fmt: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of an exported file, read with the format's own reader."""
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
        return list(rows[0]), rows
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), _from_text(rows)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column_names, _from_text(table.to_pylist())


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_round_trips_in_every_format_with_its_citations(
    batch: Batch, tmp_path: Path, fmt: str
) -> None:
    out, cites = tmp_path / f"out.{fmt}", tmp_path / f"citations.{fmt}"
    assert cli.main(["export", batch.id, "--format", fmt, "-o", str(out), "--citations", str(cites)]) == 0
    columns, rows = _read(out, fmt)
    assert columns == [c.name for c in JOB_COLUMNS]
    assert rows == _expected_rows(batch)
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "succeeded", "failed", "queued"]
    columns, cite_rows = _read(cites, fmt)
    assert columns == [c.name for c in CITATION_COLUMNS]
    expected = _expected_citations(batch)
    assert len(expected) == 12  # 3 answers x 2 fields x 2 citations
    key = lambda r: (r["job_id"], r["field_position"], r["position"])  # noqa: E731
    assert sorted(cite_rows, key=key) == sorted(expected, key=key)
    assert cite_rows[0]["domain"] == "docs0.example.com"
    assert not list(tmp_path.glob("*.part"))


def test_jsonl_and_csv_go_to_stdout_without_o(batch: Batch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", batch.id]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]  # the U+2028 in a content is no line break
    assert [json.loads(line)["custom_id"] for line in lines] == [f"r{i}" for i in range(5)]
    assert cli.main(["export", batch.id, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith(",".join(c.name for c in JOB_COLUMNS) + "\r\n")


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(cli, "_client", lambda _args: pytest.fail("the API was called"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["export", "bat_x", "--format", "parquet", "-o", str(tmp_path / "x.parquet")])
    assert stopped.value.code == PARQUET_MISSING
    assert "pip install 'pcq[parquet]'" in PARQUET_MISSING
    assert not list(tmp_path.iterdir())


def test_parquet_needs_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", lambda _args: pytest.fail("the API was called"))
    with pytest.raises(SystemExit, match="-o FILE"):
        cli.main(["export", "bat_x", "--format", "parquet"])


def test_an_unknown_batch_or_a_bad_key_stops_with_one_line_and_no_file(
    batch: Batch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit, match=r"^pcq: HTTP 404 not_found: no batch 'bat_nope'"):
        cli.main(["export", "bat_nope", "--format", "csv", "-o", str(out)])
    monkeypatch.setattr(cli, "_client", lambda _args: _ViaTestClient(batch.http, "pcq_000000000000_wrong"))
    with pytest.raises(SystemExit, match=r"^pcq: HTTP 401"):
        cli.main(["export", batch.id, "--format", "csv", "-o", str(out)])
    assert not list(tmp_path.glob("out.csv*"))


def test_an_unreachable_api_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("PCQ_API_URL", "PCQ_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PCQ_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("PCQ_API_KEY", "pcq_000000000000_x")
    with pytest.raises(SystemExit, match="cannot reach the API"):
        cli.main(["export", "bat_x", "-o", str(tmp_path / "out.jsonl")])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "url",
    [
        "https://Docs.Example.com/a/b?x=1#f",
        "http://user:pw@Host.COM:8080/x",
        "https://[::1]:80/p",
        "https://[bad/x",
        "mailto:a//b",
        "http:x//y/z",
        "nohost",
        "https://a.com?q=//x",
        "https://a.com#//x",
        "//b.org/x",
        "HTTPS://Ü.de/x",
        " https://a.b/",
    ],
)
def test_the_cached_citation_domain_is_the_apis_domain(url: str) -> None:
    assert citation_domain(url) == url_domain(url)
