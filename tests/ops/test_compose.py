"""docker-compose.yml cannot run here (no Docker engine): check what can be checked of it."""

from __future__ import annotations

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
