"""The command line, run as a user runs it: a subprocess with an environment."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pcq.db import make_engine, make_session_factory, unit_of_work
from pcq.keys import KEY_PATTERN
from pcq.models import ApiKey, Job, Tenant, utcnow
from pcq.settings import key_id
from pcq.tenants import tenant_for_key

ROOT = Path(__file__).resolve().parents[2]


def pcq(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PCQ_") and k not in ("REDIS_URL", "DATABASE_URL", "PARALLEL_API_KEY")
    }
    return subprocess.run(
        [sys.executable, "-m", "shell.cli", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # never a terminal: the CLI must not prompt for a key here
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_keys_create_prints_the_key_last_and_stores_only_a_hash(sqlite_url: str) -> None:
    out = pcq("keys", "create", "--tenant", "acme", env={"DATABASE_URL": sqlite_url})
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("pcq_")
    engine = make_engine(sqlite_url)
    with make_session_factory(engine)() as s:
        rows = list(s.scalars(select(ApiKey)))
    engine.dispose()
    assert len(rows) == 1
    assert key not in (rows[0].key_hash, rows[0].prefix)
    assert rows[0].prefix in key


def test_keys_list_shows_ids_tenants_and_prefixes_never_a_secret_or_hash(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    keys = [pcq("keys", "create", "--tenant", t, env=env).stdout.splitlines()[-1] for t in ("acme", "globex")]
    engine = make_engine(sqlite_url)
    with make_session_factory(engine)() as s:
        rows = list(s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))
    engine.dispose()
    assert pcq("keys", "revoke", rows[1].id, env=env).returncode == 0
    out = pcq("keys", "list", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["id", "tenant", "key", "created", "revoked", "expires", "last_used"]
    assert len(lines) == 3
    first, second = (line.split() for line in lines[1:])
    assert first[:3] == [rows[0].id, "acme", f"pcq_{rows[0].prefix}_…"]
    assert first[4:] == ["-", "never", "never"]
    assert second[:3] == [rows[1].id, "globex", f"pcq_{rows[1].prefix}_…"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", second[4])
    for key, row in zip(keys, rows, strict=True):
        assert key.split("_", 2)[2] not in out.stdout  # the secret part
        assert row.key_hash not in out.stdout


def test_keys_create_expires_in_sets_the_expiry_and_shows_it(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    before = utcnow()
    out = pcq("keys", "create", "--tenant", "acme", "--expires-in", "90d", env=env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[-1]
    assert re.fullmatch(KEY_PATTERN, key)
    engine = make_engine(sqlite_url)
    with make_session_factory(engine)() as s:
        expires_at = s.scalars(select(ApiKey.expires_at)).one()
    engine.dispose()
    assert expires_at is not None
    assert before + timedelta(days=90) <= expires_at <= utcnow() + timedelta(days=90)
    shown = expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"it expires at {shown}" in out.stdout
    listed = pcq("keys", "list", env=env).stdout.splitlines()[1].split()
    assert listed[4:] == ["-", shown, "never"]
    never = pcq("keys", "create", "--tenant", "acme", env=env)
    assert "it never expires" in never.stdout


@pytest.mark.parametrize(
    ("given", "says"),
    [("0d", "more than 0"), ("-5d", "more than 0"), ("90", "a whole number and a unit"), ("soon", "unit")],
)
def test_keys_create_refuses_a_bad_expires_in_and_creates_nothing(
    sqlite_url: str, given: str, says: str
) -> None:
    out = pcq("keys", "create", "--tenant", "acme", f"--expires-in={given}", env={"DATABASE_URL": sqlite_url})
    assert out.returncode == 2
    assert "--expires-in" in out.stderr
    assert says in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    engine = make_engine(sqlite_url)
    with make_session_factory(engine)() as s:
        assert s.scalars(select(ApiKey)).all() == []
        assert s.scalars(select(Tenant)).all() == []
    engine.dispose()


def test_keys_list_shows_when_each_key_was_last_used(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    used, unused = (pcq("keys", "create", "--tenant", t, env=env).stdout.splitlines()[-1] for t in ("a", "b"))
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    with unit_of_work(sessions) as s:  # as the API authenticates a request
        tenant_for_key(s, used, "", utcnow())
    with sessions() as s:
        last_used_at = s.scalars(select(ApiKey.last_used_at).where(ApiKey.last_used_at.is_not(None))).one()
    engine.dispose()
    out = pcq("keys", "list", env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()[1:]}
    assert rows["a"][6] == last_used_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows["b"][6] == "never"
    assert unused[17:] not in out.stdout


def test_keys_revoke_sets_revoked_at_once_and_refuses_an_unknown_id(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    pcq("keys", "create", "--tenant", "acme", env=env)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with factory() as s:
        key_id = s.scalars(select(ApiKey.id)).one()
    first = pcq("keys", "revoke", key_id, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"revoked {key_id}")
    with factory() as s:
        revoked_at = s.scalars(select(ApiKey.revoked_at)).one()
    assert revoked_at is not None
    again = pcq("keys", "revoke", key_id, env=env)
    assert again.returncode == 0, again.stderr
    assert "already revoked" in again.stdout
    with factory() as s:
        assert s.scalars(select(ApiKey.revoked_at)).one() == revoked_at  # kept, not moved
    engine.dispose()
    unknown = pcq("keys", "revoke", "key_nope", env=env)
    assert unknown.returncode == 1
    assert "key_nope" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_an_unknown_pcq_setting_fails_with_a_clear_message(sqlite_url: str) -> None:
    out = pcq("migrate", env={"DATABASE_URL": sqlite_url, "PCQ_MAX_ATTEMPT": "3"})
    assert out.returncode != 0
    assert "PCQ_MAX_ATTEMPT" in out.stderr


def test_submit_without_a_key_fails_clearly(tmp_path: Path) -> None:
    f = tmp_path / "b.jsonl"
    f.write_text("{}\n")
    out = pcq("submit", str(f))
    assert out.returncode != 0
    assert "PCQ_API_KEY" in out.stderr


def test_submit_of_a_missing_file_fails_clearly() -> None:
    out = pcq("submit", "/nonexistent.jsonl", "--api-key", "pcq_x_y")
    assert out.returncode != 0
    assert "no such file" in out.stderr


@pytest.mark.e2e
def test_standalone_demo_prints_answers_and_citations(tmp_path: Path) -> None:
    """The README's run command: everything embedded, nothing else running."""
    out = pcq("standalone", "--demo", "--port", str(_free_port()), cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "== founders" in out.stdout
    assert "answer:" in out.stdout
    assert "citations (3 rows in the database)" in out.stdout
    assert "https://" in out.stdout
    assert "succeeded=4" in out.stdout
    assert (tmp_path / "pcq.sqlite3").exists()


def _free_port() -> int:
    from shell.procs import free_port

    return free_port()


@pytest.mark.e2e
def test_submit_wait_and_export_against_a_running_stack(tmp_path: Path, sqlite_url: str) -> None:
    from tests.stack import Stack, stack_env

    env = stack_env(sqlite_url, None)
    stack = Stack(env, tmp_path)
    try:
        stack.start_mock()
        stack.start_api()
        stack.start_worker()
        key = pcq("keys", "create", "--tenant", "cli", env={"DATABASE_URL": sqlite_url}).stdout.splitlines()[
            -1
        ]
        client_env = {"PCQ_API_URL": stack.api_url, "PCQ_API_KEY": key}
        lines = [
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "body": {"model": "lite", "messages": [{"role": "user", "content": f"q{i}"}]},
                }
            )
            for i in range(5)
        ]
        f = tmp_path / "batch.jsonl"
        f.write_text("\n".join(lines) + "\n")
        out = pcq("submit", str(f), "--wait", env=client_env)
        assert out.returncode == 0, out.stderr
        batch_id = out.stdout.strip().splitlines()[-1]
        assert "succeeded 5" in out.stderr
        assert "5/5" in out.stderr  # the progress bar reached the end
        as_csv = pcq("export", batch_id, "--format", "csv", env=client_env)
        rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
        assert [r["custom_id"] for r in rows] == [f"r{i}" for i in range(5)]
        assert all(r["status"] == "succeeded" and int(r["citation_count"]) == 3 for r in rows)
        as_jsonl = pcq(
            "export", batch_id, "--format", "jsonl", "-o", str(tmp_path / "out.jsonl"), env=client_env
        )
        assert as_jsonl.returncode == 0
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5
        out, cites = tmp_path / "out.parquet", tmp_path / "cites.parquet"
        as_parquet = pcq(
            "export",
            batch_id,
            "--format",
            "parquet",
            "-o",
            str(out),
            "--citations",
            str(cites),
            env=client_env,
        )
        assert as_parquet.returncode == 0, as_parquet.stderr
        import pyarrow.parquet as pq

        assert pq.read_table(out).column("custom_id").to_pylist() == [f"r{i}" for i in range(5)]
        assert pq.read_table(cites).num_rows == 15  # the mock: one basis field, 3 citations
        missing = pcq("export", "bat_nope", env=client_env)
        assert missing.returncode != 0
        assert "404" in missing.stderr
    finally:
        stack.stop_all()


def test_keys_upstream_lists_ids_and_limits_never_the_keys() -> None:
    env = {
        "PARALLEL_API_KEY": "sk-live-main-key-AAAA",
        "PCQ_UPSTREAM_KEYS": json.dumps(
            [{"key": "sk-live-second-key-BBBB", "rate_limit_per_minute": 1200, "max_in_flight": 50}]
        ),
    }
    out = pcq("keys", "upstream", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].split() == [key_id("sk-live-main-key-AAAA"), "AAAA", "300", "5", "none"]
    assert lines[2].split() == [key_id("sk-live-second-key-BBBB"), "BBBB", "1200", "5", "50"]
    assert "sk-live" not in out.stdout + out.stderr


def _shares(url: str) -> dict[str, tuple[int, float]]:
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        rows = s.execute(select(Tenant.name, Tenant.weight, Tenant.max_share)).all()
    engine.dispose()
    return {name: (weight, max_share) for name, weight, max_share in rows}


def test_tenants_set_changes_the_weight_and_the_max_share_alone_or_together(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    for tenant in ("acme", "globex"):
        pcq("keys", "create", "--tenant", tenant, env=env)
    assert _shares(sqlite_url) == {"acme": (1, 1.0), "globex": (1, 1.0)}  # the defaults
    weight = pcq("tenants", "set", "acme", "--weight", "4", env=env)
    assert weight.returncode == 0, weight.stderr
    assert weight.stdout.strip() == "tenant 'acme': weight 4, max_share 1.0"
    assert _shares(sqlite_url) == {"acme": (4, 1.0), "globex": (1, 1.0)}
    share = pcq("tenants", "set", "acme", "--max-share", "0.25", env=env)
    assert share.returncode == 0, share.stderr
    assert _shares(sqlite_url) == {"acme": (4, 0.25), "globex": (1, 1.0)}  # the weight kept
    both = pcq("tenants", "set", "globex", "--weight", "1000", "--max-share", "1", env=env)
    assert both.returncode == 0, both.stderr
    assert _shares(sqlite_url) == {"acme": (4, 0.25), "globex": (1000, 1.0)}


def test_tenants_set_monthly_budget_is_shown_by_list_and_none_removes_it(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    pcq("keys", "create", "--tenant", "acme", env=env)
    set_ = pcq("tenants", "set", "acme", "--monthly-budget", "12.5", env=env)
    assert set_.returncode == 0, set_.stderr
    assert set_.stdout.strip() == "tenant 'acme': weight 1, max_share 1.0, monthly_budget $12.5"
    listed = pcq("tenants", "list", env=env)
    assert listed.stdout.splitlines()[1].split() == ["acme", "1", "1.0", "0", "0", "12.5", "0.0000"]
    cleared = pcq("tenants", "set", "acme", "--monthly-budget", "none", env=env)
    assert cleared.stdout.strip() == "tenant 'acme': weight 1, max_share 1.0"
    assert pcq("tenants", "list", env=env).stdout.splitlines()[1].split()[5] == "none"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nope", "--weight", "2"], "no tenant is named 'nope'"),
        (["acme", "--weight", "0"], "--weight must be a whole number from 1 to 1000"),
        (["acme", "--weight", "1001"], "--weight must be a whole number from 1 to 1000"),
        (["acme", "--weight", "1.5"], "invalid int value"),
        (["acme", "--max-share", "0"], "--max-share must be a fraction above 0 and at most 1"),
        (["acme", "--max-share", "1.01"], "--max-share must be a fraction above 0 and at most 1"),
        (["acme", "--max-share", "nan"], "--max-share must be a fraction above 0 and at most 1"),
        (["acme", "--weight", "2", "--max-share", "-0.5"], "--max-share must be"),
        (["acme"], "give --weight, --max-share, --monthly-budget or several"),
        (["acme", "--monthly-budget", "-1"], "--monthly-budget must be USD, 0 or more"),
        (["acme", "--monthly-budget", "nan"], "--monthly-budget must be USD, 0 or more"),
        (["acme", "--monthly-budget", "lots"], "not a number of USD (or none)"),
    ],
    ids=[
        "unknown-tenant",
        "weight-0",
        "weight-over-1000",
        "weight-not-whole",
        "share-0",
        "share-over-1",
        "share-nan",
        "one-of-two-bad",
        "nothing-to-set",
        "budget-negative",
        "budget-nan",
        "budget-not-a-number",
    ],
)
def test_tenants_set_refuses_with_exit_2_and_changes_nothing(
    sqlite_url: str, args: list[str], says: str
) -> None:
    env = {"DATABASE_URL": sqlite_url}
    pcq("keys", "create", "--tenant", "acme", env=env)
    out = pcq("tenants", "set", *args, env=env)
    assert out.returncode == 2
    assert says in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    assert _shares(sqlite_url) == {"acme": (1, 1.0)}


def test_tenants_list_shows_each_share_and_its_queued_and_running_jobs(sqlite_url: str) -> None:
    env = {"DATABASE_URL": sqlite_url}
    for tenant in ("globex", "acme", "initech"):
        pcq("keys", "create", "--tenant", tenant, env=env)
    assert pcq("tenants", "set", "acme", "--weight", "3", "--max-share", "0.5", env=env).returncode == 0
    engine = make_engine(sqlite_url)
    with make_session_factory(engine)() as s:
        ids = {name: id_ for name, id_ in s.execute(select(Tenant.name, Tenant.id))}
        statuses = {"acme": ["queued"] * 3 + ["running"] * 2 + ["succeeded"], "globex": ["failed", "running"]}
        for name, these in statuses.items():
            for n, status in enumerate(these):
                s.add(
                    Job(
                        id=f"job_{name}_{n}",
                        tenant_id=ids[name],
                        request_json="{}",
                        model="lite",
                        status=status,
                    )
                )
        s.commit()
    engine.dispose()
    out = pcq("tenants", "list", env=env)
    assert out.returncode == 0, out.stderr
    assert [line.split() for line in out.stdout.splitlines()] == [
        ["name", "weight", "max_share", "queued", "running", "monthly_budget", "spent_this_month"],
        ["acme", "3", "0.5", "3", "2", "none", "0.0000"],
        ["globex", "1", "1.0", "0", "1", "none", "0.0000"],
        ["initech", "1", "1.0", "0", "0", "none", "0.0000"],
    ]
