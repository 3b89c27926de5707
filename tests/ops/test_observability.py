"""The monitoring the compose `observability` profile ships: Prometheus' config and alert rules
(checked and unit-tested by promtool), the Grafana dashboard, and that every metric they read
is one pcq exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from api.metrics import exported_metric_names as api_metric_names
from tests.conftest import _unavailable
from worker.metrics import exported_metric_names as worker_metric_names

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "pcq.json"
RUNBOOK = ROOT / "ops" / "RUNBOOK.md"

# prometheus_client names a counter's family without `_total`; a histogram's series add these.
SERIES_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
METRIC = re.compile(r"\bpcq_[a-z0-9_]+")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        _unavailable("promtool is not installed (Debian: apt-get install prometheus)")
        raise AssertionError  # unreachable: _unavailable skips or fails
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _graph_panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _graph_panels() for t in p["targets"]]


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _families(exprs: list[str]) -> set[str]:
    """The metric families an expression reads, named as prometheus_client names them."""
    names = set()
    for expr in exprs:
        for series in METRIC.findall(expr):
            for suffix in SERIES_SUFFIXES:
                if series.endswith(suffix):
                    series = series[: -len(suffix)]
                    break
            names.add(series)
    return names


def test_family_names_are_taken_from_series_names() -> None:
    exprs = [
        'sum(rate(pcq_upstream_429_total[5m])) / sum(rate(pcq_upstream_requests_total{outcome="ok"}[5m]))',
        "histogram_quantile(0.95, sum by (le) (rate(pcq_db_write_seconds_bucket[5m])))",
        "pcq_db_write_seconds_sum / pcq_db_write_seconds_count + max(pcq_jobs) + up",
    ]
    assert _families(exprs) == {
        "pcq_upstream_429",
        "pcq_upstream_requests",
        "pcq_db_write_seconds",
        "pcq_jobs",
    }


def test_alert_rules_pass_promtool_check() -> None:
    run = _promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in run.stdout


def test_alert_rules_fire_on_their_unit_test_series() -> None:
    run = _promtool("test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in _alert_rules()}


def test_prometheus_config_passes_promtool_check() -> None:
    """rule_files is relative to the config file, so the repository's layout is the container's."""
    run = _promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_scrapes_the_api_and_every_worker_replica() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pcq-api"]["static_configs"] == [{"targets": ["api:8000"]}]
    # DNS service discovery on the compose service name covers `--scale worker=N`.
    assert jobs["pcq-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9100, "refresh_interval": "15s"}
    ]
    assert config["rule_files"] == ["alerts.yml"]


def test_every_alert_has_a_duration_a_severity_and_a_runbook_section() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    for rule in _alert_rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "ops/RUNBOOK.md"
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {RUNBOOK.name}"
        # The runbook's alert index names it too.
        assert f"`{rule['alert']}`" in RUNBOOK.read_text(), rule["alert"]


def test_the_alerts_cover_what_the_issue_asks_for() -> None:
    exprs = " ".join(rule["expr"] for rule in _alert_rules())
    for metric in (
        "pcq_oldest_queued_job_age_seconds",
        'outcome="fatal"',
        "pcq_upstream_429_total",
        "pcq_sweeper_resent_total",
        "pcq_webhook_attempts_total",
        'up{job="pcq-worker"}',
    ):
        assert metric in exprs, metric


def test_the_dashboard_is_provisioned_from_the_repository() -> None:
    provider = yaml.safe_load((ROOT / "ops/grafana/provisioning/dashboards/pcq.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./ops/grafana/pcq.json:{path}/pcq.json:ro" in grafana["volumes"]
    source = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    for panel in _graph_panels():
        assert panel["datasource"]["uid"] == uid, panel["title"]


def test_every_dashboard_panel_has_a_query_and_a_unique_title() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "pcq"
    panels = _graph_panels()
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    for title in (
        "Quota use vs quota",
        "Throughput",
        "Failures by class",
        "Queue age",
        "In-flight calls",
        "Webhook health",
    ):
        assert title in titles, title
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool has no query linter; a rule file of one recording rule per panel query is one."""
    values = {"$__rate_interval": "5m"}
    variables = {v["name"] for v in _dashboard()["templating"]["list"]}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for name in re.findall(r"\$(\w+)", expr):
            assert name in variables or f"${name}" in values, f"unknown variable ${name} in {expr}"
        for var, value in values.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"pcq:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = _promtool("check", "rules", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout


def test_the_dashboard_and_alerts_read_only_metrics_pcq_exports() -> None:
    exported = api_metric_names() | worker_metric_names()
    used = _families(_dashboard_exprs() + [rule["expr"] for rule in _alert_rules()])
    assert len(used) >= 15
    assert used <= exported, f"used but not exported: {sorted(used - exported)}"


def _runbook_sections() -> dict[str, str]:
    sections: dict[str, str] = {}
    title = ""
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return sections


def test_the_runbook_covers_each_failure_with_its_symptom_and_commands() -> None:
    sections = _runbook_sections()
    for title in (
        "Redis lost",
        "PostgreSQL failover",
        "Quota changed",
        "Poison job",
        "Upstream outage",
        "Key rotation (upstream and tenant)",
        "Webhook receiver down for days",
    ):
        body = sections[title]
        assert "**Dashboard" in body, title
        assert "```bash" in body, title
        assert "**Recovered when**" in body, title


def test_the_runbook_names_only_panels_the_dashboard_has() -> None:
    """Symptoms are quoted panel titles: renaming a panel must update the runbook too."""
    titles = {p["title"] for p in _graph_panels()}
    quoted = set()
    for paragraph in RUNBOOK.read_text().split("\n\n"):
        if paragraph.startswith("**Dashboard"):
            quoted |= {" ".join(q.split()) for q in re.findall(r'"([^"]+)"', paragraph)}
    assert len(quoted) >= 10
    assert quoted <= titles, sorted(quoted - titles)
