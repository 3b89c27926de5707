"""The README stays true: every setting is in its table, every CLI command in its examples."""

from __future__ import annotations

from pathlib import Path

from pcq.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert f"| `{field.validation_alias}` |" in README, name


def test_every_cli_command_is_shown() -> None:
    for cmd in (
        "migrate",
        "keys create",
        "tenants set",
        "tenants list",
        "api",
        "worker",
        "standalone",
        "mock-upstream",
        "submit",
        "export",
        "watch",
    ):
        assert f"pcq {cmd}" in README, cmd


def test_every_route_has_a_curl_example() -> None:
    for route in ("/v1/jobs", "/v1/batches", "/results", "/events", "/v1/citations", "/healthz", "/readyz"):
        assert f"$API{route}" in README or route in README, route
