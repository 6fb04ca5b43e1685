"""The shipped Prometheus rules and Grafana dashboard are valid and use only metrics the product exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.test import Client
from prometheus_client import generate_latest

import gateway.metrics  # noqa: F401  (registers the gateway's metrics in this process)
from apimgmt.management.commands.deliver_events import DelivererMetrics
from apimgmt.management.commands.flush_usage import FlusherMetrics
from tests.support.promtool import promtool

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "prometheus" / "rules.yml"
DASHBOARD = MONITORING / "grafana" / "apimgmt-dashboard.json"
OPERATIONS = MONITORING.parent / "docs" / "operations.md"
_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")
_PROMQL_WORDS = {"sum", "rate", "increase", "max", "avg", "by", "histogram_quantile", "time", "absent", "and", "le"}


def _exposed_metric_names(client: Client) -> set[str]:
    client.get("/health")  # a request through Django's middleware, as any scrape would follow
    # What the metrics listener exports (gunicorn.conf.py sums the workers' copies of this registry) and the flusher's.
    text = generate_latest().decode() + generate_latest(FlusherMetrics().registry).decode()
    text += generate_latest(DelivererMetrics().registry).decode()  # and the event deliverer's
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    return {name + suffix for name in names for suffix in _SUFFIXES}


def _metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|by \([^)]*\)", "", without_strings)
    words = set(re.findall(r"[a-z_][a-z0-9_]*", without_labels))
    return {w for w in words - _PROMQL_WORDS if "_" in w}


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    checked = subprocess.run([str(tool), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [str(tool), "test", "rules", "rules_test.yml"], cwd=RULES.parent, capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_guides_high_error_rate_alert_is_shipped() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == "HighErrorRate"]
    assert rule["for"] == "2m"
    assert 'status=~"5.."' in rule["expr"] and "[5m]" in rule["expr"] and rule["expr"].strip().endswith("> 0.1")


def _runbook_anchors() -> set[str]:
    """GitHub's heading anchors of docs/operations.md."""
    anchors = set()
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_section_and_is_in_the_operations_alert_table() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    anchors = _runbook_anchors()
    guide = OPERATIONS.read_text()
    for rule in (r for g in groups for r in g["rules"]):
        runbook = rule["annotations"].get("runbook", "")
        document, _, anchor = runbook.partition("#")
        assert document == "docs/operations.md", f"{rule['alert']}: runbook {runbook!r}"
        assert anchor in anchors, f"{rule['alert']} points to a missing runbook section: #{anchor}"
        assert f"| `{rule['alert']}` |" in guide, f"{rule['alert']} is missing from the operations alert table"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_used_is_one_the_product_exposes(source: str, client: Client, db: Any) -> None:
    exposed = _exposed_metric_names(client)
    exprs = _rule_exprs() if source == "rules" else _dashboard_exprs()
    used = set().union(*(_metric_names_in(e) for e in exprs))
    assert used, "the extraction found metric names"
    assert used <= exposed, f"unknown metrics: {sorted(used - exposed)}"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all(panel["targets"] for panel in dashboard["panels"])
