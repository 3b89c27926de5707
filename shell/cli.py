"""``pcq``: the command line of the service (run ``pcq --help``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pcq import logs
from pcq.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except (SettingsError, ValueError) as exc:
        raise SystemExit(f"pcq: configuration error: {exc}") from None


def cmd_migrate(_: argparse.Namespace) -> int:
    from migrations.migrate import upgrade_to_head

    settings = _settings()
    upgrade_to_head(settings.database_url)
    print("database is at the latest schema", file=sys.stderr)  # noqa: T201
    return 0


def _lifetime(text: str) -> timedelta:
    """``--expires-in``: checked by argparse, so a bad value exits 2 before anything is created."""
    from pcq.keys import parse_lifetime

    try:
        return parse_lifetime(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_keys_create(args: argparse.Namespace) -> int:
    from pcq.db import make_engine, make_session_factory, unit_of_work
    from pcq.models import utcnow
    from pcq.tenants import create_key

    settings = _settings()
    expires_at = utcnow() + args.expires_in if args.expires_in is not None else None
    engine = make_engine(settings.database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            tenant, key = create_key(session, args.tenant, settings.key_pepper.get_secret_value(), expires_at)
    finally:
        engine.dispose()
    lifetime = f"it expires at {_when(expires_at)}" if expires_at is not None else "it never expires"
    print(f"created a key for tenant {tenant.name!r} ({tenant.id}); {lifetime}; it is shown only once:")  # noqa: T201
    print(key)  # noqa: T201
    return 0


def _when(value: datetime | None, none: str = "-") -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else none


def _read(fn: Callable[[Session], T]) -> T:
    """``fn`` in a read session on the configured database (its engine disposed after)."""
    from pcq.db import make_engine, make_session_factory

    engine = make_engine(_settings().database_url)
    try:
        with make_session_factory(engine)() as session:
            return fn(session)
    finally:
        engine.dispose()


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, the last one left ragged."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]))  # noqa: T201


def cmd_keys_list(_: argparse.Namespace) -> int:
    """Every API key: id, tenant, ``pcq_<prefix>_…``, created, revoked, expires, last used.
    Never a secret or hash."""
    from pcq.tenants import list_keys

    keys = _read(list_keys)
    rows = [("id", "tenant", "key", "created", "revoked", "expires", "last_used")]
    rows += [
        (
            k.id,
            k.tenant_name,
            k.shown,
            _when(k.created_at),
            _when(k.revoked_at),
            _when(k.expires_at, "never"),
            _when(k.last_used_at, "never"),
        )
        for k in keys
    ]
    _print_table(rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke an API key by id (see ``pcq keys list``); revoking it again changes nothing."""
    from pcq.db import make_engine, make_session_factory, unit_of_work
    from pcq.models import utcnow
    from pcq.tenants import UnknownKey, revoke_key

    engine = make_engine(_settings().database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            key, revoked_now = revoke_key(session, args.key_id, utcnow())
    except UnknownKey:
        raise SystemExit(f"pcq: no API key has the id {args.key_id!r} (see `pcq keys list`)") from None
    finally:
        engine.dispose()
    which = f"{key.id} ({key.shown}, tenant {key.tenant_name!r})"
    if revoked_now:
        print(f"revoked {which} at {_when(key.revoked_at)}")  # noqa: T201
    else:
        print(f"{which} was already revoked at {_when(key.revoked_at)}")  # noqa: T201
    return 0


def cmd_keys_upstream(args: argparse.Namespace) -> int:  # noqa: ARG001
    """The upstream key pool as the workers will use it: the id that `attempts.upstream_key_id`
    holds, the key's last 4 characters (never more), its quota, burst and in-flight cap."""
    pool = _settings().key_pool()
    print("id                last4  per_minute  burst  max_in_flight")  # noqa: T201
    for k in pool:
        last4 = k.key[-4:] if len(k.key) >= 12 else "-"  # short keys: show nothing of them
        cap = k.max_in_flight or "none"
        print(f"{k.id}  {last4:>5}  {k.rate_limit_per_minute:>10}  {k.rate_limit_burst:>5}  {cap!s:>13}")  # noqa: T201
    return 0


def cmd_tenants_set(args: argparse.Namespace) -> int:
    """Set a tenant's weight, quota cap or both; exit 2, nothing changed, for an unknown tenant
    or a value out of range."""
    from pcq.db import make_engine, make_session_factory, unit_of_work
    from pcq.tenants import InvalidShare, UnknownTenant, set_share

    engine = make_engine(_settings().database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            tenant = set_share(
                session,
                args.name,
                weight=args.weight,
                max_share=args.max_share,
                monthly_budget=args.monthly_budget,
            )
    except UnknownTenant:
        print(  # noqa: T201
            f"pcq: no tenant is named {args.name!r} (see `pcq tenants list`; "
            "`pcq keys create --tenant NAME` creates one)",
            file=sys.stderr,
        )
        return 2
    except InvalidShare as exc:
        print(f"pcq: {exc}; nothing was changed", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        engine.dispose()
    budget = "" if tenant.monthly_budget is None else f", monthly_budget ${tenant.monthly_budget:g}"
    print(f"tenant {tenant.name!r}: weight {tenant.weight}, max_share {tenant.max_share}{budget}")  # noqa: T201
    return 0


def _usd(text: str) -> float:
    """``--monthly-budget``: USD, or ``none`` for no limit."""
    from pcq.tenants import NO_BUDGET

    if text.strip().lower() == "none":
        return NO_BUDGET
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of USD (or none): {text!r}") from None


def cmd_tenants_list(_: argparse.Namespace) -> int:
    """Every tenant: name, weight, max_share, queued and running jobs, monthly budget and this
    month's spend (USD, calendar month UTC)."""
    from pcq.tenants import list_tenants

    tenants = _read(list_tenants)
    rows = [("name", "weight", "max_share", "queued", "running", "monthly_budget", "spent_this_month")]
    rows += [
        (
            t.name,
            str(t.weight),
            str(t.max_share),
            str(t.queued),
            str(t.running),
            "none" if t.monthly_budget is None else f"{t.monthly_budget:g}",
            f"{t.spent_this_month:.4f}",
        )
        for t in tenants
    ]
    _print_table(rows)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from api.app import create_app, serve

    settings = _settings()
    serve(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.app import run_worker

    settings = _settings()
    run_worker(settings, concurrency=args.concurrency, loglevel=settings.log_level)
    return 0


def cmd_healthcheck(_: argparse.Namespace) -> int:
    """Exit 0 if this host's worker engine turned its loop recently (for container probes)."""
    import time

    from worker.engine import heartbeat_path

    settings = _settings()
    path = heartbeat_path(settings)
    max_age = max(60.0, 5 * settings.sweep_interval_seconds)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat at {path}", file=sys.stderr)  # noqa: T201
        return 1
    if age > max_age:
        print(f"unhealthy: last heartbeat {age:.0f} s ago", file=sys.stderr)  # noqa: T201
        return 1
    print(f"healthy: last heartbeat {age:.1f} s ago")  # noqa: T201
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from mock_upstream import MockConfig, parse_key_quotas, serve

    by_key_env = args.enforce_rpm_by_key_env
    accepted = os.environ.get(args.api_keys_env, "") if args.api_keys_env else ""
    config = MockConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        citations_per_field=args.citations,
        fault_429_rate=args.fault_429,
        retry_after_seconds=args.retry_after,
        fault_5xx_rate=args.fault_5xx,
        fault_hang_rate=args.fault_hang,
        fault_truncate_rate=args.fault_truncate,
        fault_malformed_rate=args.fault_malformed,
        null_usage_rate=args.null_usage,
        enforce_rpm=args.enforce_rpm,
        enforce_rpm_by_key=parse_key_quotas(os.environ.get(by_key_env, "")) if by_key_env else {},
        api_keys=tuple(k.strip() for k in accepted.split(",") if k.strip()),
        seed=args.seed,
    )
    serve(args.host, args.port, config)
    return 0


def cmd_standalone(args: argparse.Namespace) -> int:
    from shell.standalone import run_standalone

    return run_standalone(_settings(), port=args.port, demo=args.demo)


def _api_key(args: argparse.Namespace, settings: Settings) -> str:
    """The key for the API: ``PCQ_API_KEY``, else a prompt when stdin is a terminal.
    ``--api-key`` still works, with a warning: a key on the command line shows in the process
    list and in shell history."""
    if args.api_key:
        print(  # noqa: T201
            "pcq: warning: --api-key puts the key in the process list and your shell history; "
            "set PCQ_API_KEY instead (or leave both out to be prompted)",
            file=sys.stderr,
        )
        key: str = args.api_key
        return key
    if settings.api_key is not None and settings.api_key.get_secret_value():
        return settings.api_key.get_secret_value()
    if sys.stdin.isatty():
        import getpass

        try:
            key = getpass.getpass("pcq API key: ").strip()
        except (EOFError, KeyboardInterrupt):
            key = ""
        if key:
            return key
    raise SystemExit(
        "pcq: no API key: set PCQ_API_KEY (or type it when prompted at a terminal; see `pcq keys create`)"
    )


def _client(args: argparse.Namespace) -> Any:
    from shell.client import PcqClient

    settings = _settings()
    return PcqClient(args.api_url or settings.api_url, _api_key(args, settings))


@contextmanager
def _api_call(client: Any) -> Iterator[None]:
    """Around a command's calls to the API: one line, not a traceback, when the API refuses or
    cannot be reached; the client closed either way."""
    import httpx

    from shell.client import ApiError

    try:
        yield
    except ApiError as exc:
        raise SystemExit(f"pcq: {exc}") from None
    except httpx.HTTPError as exc:  # the API is not there (refused, timed out, reset)
        raise SystemExit(f"pcq: cannot reach the API (PCQ_API_URL): {type(exc).__name__}") from None
    finally:
        client.close()


def cmd_submit(args: argparse.Namespace) -> int:
    from shell.watch import exit_status, summary, watch_batch

    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"pcq: no such file: {path}")
    client = _client(args)
    with _api_call(client):
        batch = client.submit_batch_jsonl(path.read_bytes(), idempotency_key=args.idempotency_key)
        print(f"batch {batch['id']}: {batch['total']} job(s) queued", file=sys.stderr)  # noqa: T201
        if args.wait:
            batch = watch_batch(client, batch["id"])
            print(summary(batch), file=sys.stderr)  # noqa: T201
            print(batch["id"])  # noqa: T201
            return exit_status(batch)
        print(batch["id"])  # noqa: T201
        return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from shell.watch import watch_command

    return watch_command(_client(args), args.batch_id)


def cmd_export(args: argparse.Namespace) -> int:
    from shell.export import check_format, export_batch

    check_format(args.format, args.output)  # before asking for a key or calling the API
    client = _client(args)
    with _api_call(client):
        return export_batch(
            client, args.batch_id, fmt=args.format, output=args.output, citations=args.citations
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pcq", description="Durable job service for Parallel's Chat Completions API."
    )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(fn=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="mint a key for a tenant (created if new); prints it once, last")
    kc.add_argument("--tenant", required=True)
    kc.add_argument(
        "--expires-in",
        type=_lifetime,
        metavar="DURATION",
        help="refuse the key this long from now: a whole number and s, m, h, d or w (90d, 12h, 2w); "
        "default: never",
    )
    kc.set_defaults(fn=cmd_keys_create)
    keys.add_parser(
        "list",
        help="list the API keys: id, tenant, pcq_<prefix>_…, created, revoked, expires, last used "
        "(never a secret)",
    ).set_defaults(fn=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke an API key by id (from `pcq keys list`); effective at once")
    kr.add_argument("key_id")
    kr.set_defaults(fn=cmd_keys_revoke)
    ku = keys.add_parser(
        "upstream",
        help="list the upstream keys (ids as in attempts.upstream_key_id, last 4 characters, limits)",
    )
    ku.set_defaults(fn=cmd_keys_upstream)

    tenants = sub.add_parser("tenants", help="each tenant's share of the upstream quota").add_subparsers(
        dest="tenants_command", required=True
    )
    ts = tenants.add_parser(
        "set",
        help="set a tenant's weight, quota cap, monthly budget or several (an unknown tenant: exit 2, "
        "nothing changed)",
    )
    ts.add_argument("name", help="the tenant's name, as given to `pcq keys create --tenant`")
    ts.add_argument(
        "--weight",
        type=int,
        default=None,
        help="its share of the quota against other tenants with work waiting: 1 (the default) to 1000",
    )
    ts.add_argument(
        "--max-share",
        type=float,
        default=None,
        help="the largest fraction of the quota it may use, even when no one else has work: "
        "above 0, at most 1 (the default)",
    )
    ts.add_argument(
        "--monthly-budget",
        type=_usd,
        default=None,
        metavar="USD",
        help="USD its calls may cost per calendar month (UTC): no call starts that could pass it, the "
        "jobs left end cancelled (budget_exceeded); `none` removes the limit (the default)",
    )
    ts.set_defaults(fn=cmd_tenants_set)
    tenants.add_parser(
        "list",
        help="list the tenants: name, weight, max_share, queued and running jobs, monthly budget and "
        "this month's spend",
    ).set_defaults(fn=cmd_tenants_list)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run a worker (Celery) that calls the upstream and stores results")
    w.add_argument("--concurrency", type=int, default=None, help="Celery pool threads (claims in parallel)")
    w.set_defaults(fn=cmd_worker)

    hc = sub.add_parser("healthcheck", help="probe a local process (for container healthchecks)")
    hc.add_argument("target", choices=["worker"])
    hc.set_defaults(fn=cmd_healthcheck)

    m = sub.add_parser("mock-upstream", help="serve a local stand-in of the Parallel chat endpoint")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8900)
    m.add_argument("--latency-ms", type=float, default=200.0)
    m.add_argument("--latency-jitter-ms", type=float, default=0.0)
    m.add_argument("--citations", type=int, default=3, help="citations per basis field")
    m.add_argument("--fault-429", type=float, default=0.0, help="share of requests answered 429")
    m.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on 429")
    m.add_argument("--fault-5xx", type=float, default=0.0)
    m.add_argument("--fault-hang", type=float, default=0.0)
    m.add_argument("--fault-truncate", type=float, default=0.0)
    m.add_argument("--fault-malformed", type=float, default=0.0)
    m.add_argument("--null-usage", type=float, default=0.0)
    m.add_argument("--enforce-rpm", type=int, default=None, help="answer 429 above this many requests/min")
    m.add_argument(
        "--enforce-rpm-by-key-env",
        metavar="VAR",
        help="per-key quotas read from this env var as key=rpm,key=rpm (keys stay out of `ps`)",
    )
    m.add_argument(
        "--api-keys-env",
        metavar="VAR",
        help="accept only the keys in this env var (key1,key2) and answer 401 to any other; "
        "default: any non-empty key",
    )
    m.add_argument("--seed", type=int, default=None)
    m.set_defaults(fn=cmd_mock_upstream)

    st = sub.add_parser("standalone", help="API + worker (+ mock upstream) on embedded defaults")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--demo", action="store_true", help="submit sample jobs, print answers, then exit")
    st.set_defaults(fn=cmd_standalone)

    for name, fn, helptext in (
        ("submit", cmd_submit, "submit a JSONL batch file"),
        ("export", cmd_export, "export a batch's results"),
    ):
        c = sub.add_parser(name, help=helptext)
        if name == "submit":
            c.add_argument("file")
            c.add_argument("--wait", action="store_true", help="wait for the batch, with a progress bar")
            c.add_argument("--idempotency-key", default=None)
        else:
            c.add_argument("batch_id")
            c.add_argument(
                "--format",
                choices=["jsonl", "csv", "parquet"],
                default="jsonl",
                help="one row per job, the same columns in each (parquet: pip install 'pcq[parquet]')",
            )
            c.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
            c.add_argument(
                "--citations", metavar="FILE", default=None, help="also write one row per citation here"
            )
        c.add_argument("--api-url", default=None, help="default: PCQ_API_URL")
        c.add_argument(
            "--api-key",
            default=None,
            help="avoid: shows in `ps` and shell history; default: PCQ_API_KEY, else a prompt at a terminal",
        )
        c.set_defaults(fn=fn)
    w = sub.add_parser(
        "watch",
        help="follow a batch to its end with a progress bar; exit 0 all succeeded, "
        "1 some failed or cancelled, 2 not followed to the end",
    )
    w.add_argument("batch_id")
    w.add_argument("--api-url", default=None, help="default: PCQ_API_URL")
    w.add_argument(
        "--api-key", default=None, help="avoid: shows in `ps`; default: PCQ_API_KEY, else a prompt"
    )
    w.set_defaults(fn=cmd_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_format, settings.log_level)
    except (SettingsError, ValueError):
        logs.configure()  # the command itself reports the configuration error
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
