"""docker-compose.yml cannot run here (no Docker engine): check what can be checked of it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from shell.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_parses_and_has_the_production_services() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], name


def test_every_built_service_uses_a_dockerfile_in_the_repo() -> None:
    for name, svc in _compose()["services"].items():
        if "build" in svc:
            dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), name
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for src in line.split()[1:-1]:
                        assert (ROOT / src).exists(), f"{dockerfile} copies missing {src}"


def test_every_pcq_command_in_compose_exists_in_the_cli() -> None:
    parser = build_parser()
    commands = []
    for svc in _compose()["services"].values():
        for argv in (svc.get("command"), (svc.get("healthcheck") or {}).get("test")):
            if argv and argv[0] == "CMD":
                argv = argv[1:]
            if argv and argv[0] == "pcq":
                commands.append(argv[1:])
    assert len(commands) >= 5
    for argv in commands:
        args = parser.parse_args(argv)  # exits (fails the test) on an unknown command or flag
        assert callable(args.fn)


def test_migrate_runs_before_api_and_worker() -> None:
    services = _compose()["services"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def _observability() -> dict[str, Any]:
    return {n: s for n, s in _compose()["services"].items() if "observability" in s.get("profiles", [])}


def test_the_observability_profile_runs_prometheus_and_grafana_on_pinned_images() -> None:
    services = _observability()
    assert set(services) == {"prometheus", "grafana"}
    for name, svc in services.items():
        repo, _, tag = svc["image"].partition(":")
        # A release number, not `latest` or a bare major: a pull months later runs the same thing.
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {svc['image']} is not pinned"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_the_production_services_start_without_the_observability_profile() -> None:
    for name, svc in _compose()["services"].items():
        if "profiles" not in svc:
            deps = svc.get("depends_on") or {}
            assert not set(deps) & set(_observability()), name


def test_every_file_compose_mounts_exists_in_the_repo() -> None:
    mounted = []
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount; the others are named volumes
                mounted.append(source)
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
    assert len(mounted) >= 5


def test_prometheus_and_grafana_listen_on_the_hosts_loopback_only() -> None:
    for name, svc in _observability().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host"
    assert _observability()["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def test_grafana_has_no_anonymous_access_and_no_baked_in_password() -> None:
    grafana = _observability()["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # Only a reference to the operator's variable, with no default after `:-`.
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert "GF_SECURITY_ADMIN_PASSWORD" in " ".join(grafana["entrypoint"])


def test_grafana_refuses_to_start_without_a_password() -> None:
    """The entrypoint's guard, run as the container's /bin/sh would (compose turns `$$` into `$`)."""
    script = _observability()["grafana"]["entrypoint"][2].replace("$$", "$").replace("/run.sh", "true")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    refused = subprocess.run(["/bin/sh", "-c", script], env=base, capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "GRAFANA_ADMIN_PASSWORD" in refused.stderr
    started = subprocess.run(
        ["/bin/sh", "-c", script], env={**base, "GF_SECURITY_ADMIN_PASSWORD": "s3cret"}, check=False
    )
    assert started.returncode == 0


def test_workers_serve_metrics_on_the_compose_network_only() -> None:
    services = _compose()["services"]
    assert services["worker"]["environment"]["PCQ_METRICS_PORT"] == "9100"
    assert "ports" not in services["worker"]
    # The worker keeps every setting the other pcq services get.
    assert set(services["api"]["environment"]) < set(services["worker"]["environment"])


def test_the_image_runs_as_a_non_root_user_on_a_pinned_slim_base() -> None:
    lines = [ln.strip() for ln in (ROOT / "ops" / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in instructions if ln.startswith("FROM "))
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    users = [i for i, ln in enumerate(instructions) if ln.startswith("USER ")]
    cmd = next(i for i, ln in enumerate(instructions) if ln.startswith("CMD "))
    assert users
    assert users[-1] < cmd
    user = instructions[users[-1]].split()[1].split(":")[0]
    assert user not in {"root", "0"}
    # Everything is copied and installed before the switch: the code stays root's, read-only to pcq.
    assert all(not ln.startswith(("COPY", "RUN", "ADD")) for ln in instructions[users[-1] :])


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "*.sqlite3", "*.sqlite3-*", ".env"} <= ignored


def test_the_api_is_published_on_the_hosts_loopback_only() -> None:
    """/metrics and /healthz answer without a key, over plain http: a proxy publishes the API."""
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    assert api["ports"] == ["127.0.0.1:8000:8000"]
