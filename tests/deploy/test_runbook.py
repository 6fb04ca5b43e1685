"""docs/operations.md: covers every topic of the operations guide, and its runnable commands work against a live instance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apimgmt import echo
from tests.deploy.conftest import ROOT
from tests.support.servers import free_port, gunicorn, wsgi_server

RUNBOOK = ROOT / "docs" / "operations.md"
FENCE = re.compile(r"^```([a-z]+)(?: ([a-z]+))?\n(.*?)^```", re.M | re.S)
VENV_BIN = str(Path(sys.executable).parent)

# The operations guide's topics and the runbook heading that answers each.
GUIDE_TOPICS = {
    "start-up problems": "Service startup problems",
    "database connection failed": "Database connection failures",
    "redis connection issues": "Redis connection failures",
    "slow responses": "Slow responses",
    "memory": "Memory usage",
    "key validation failures": "Key validation failures (401, 403)",
    "rate limiting": "Rate limiting",
    "404 route not found": "404 route not found",
    "upstream errors": "Upstream errors (502, 503, 504)",
    "slow queries and indexes": "Slow queries and indexes",
    "migrations and backups": "Migrations and backups",
    "metrics and alerts": "Metrics and alerts",
    "emergency procedures": "Emergency procedures",
    "tuning": "Tuning",
}


@dataclass
class Block:
    language: str
    tag: str
    body: str
    line: int
    section: str


def runbook_blocks() -> list[Block]:
    text = RUNBOOK.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        headings = re.findall(r"^#{2,3} (.+)$", before, re.M)
        blocks.append(
            Block(
                language=match.group(1),
                tag=match.group(2) or "",
                body=match.group(3),
                line=before.count("\n") + 1,
                section=headings[-1] if headings else "",
            )
        )
    return blocks


def _sections_with_runnable_blocks() -> set[str]:
    """Top-level (##) sections that contain at least one `run` block, their subsections included."""
    found: set[str] = set()
    top = ""
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            top = line[3:]
        if line.startswith("```") and line.endswith(" run"):
            found.add(top)
    return found


def test_runbook_covers_every_topic_of_the_operations_guide() -> None:
    headings = set(re.findall(r"^#{2,3} (.+)$", RUNBOOK.read_text(), re.M))
    missing = {topic: heading for topic, heading in GUIDE_TOPICS.items() if heading not in headings}
    assert not missing, f"runbook lacks sections for {missing}"


def test_every_top_level_topic_has_commands_that_are_exercised() -> None:
    top_level = [h for h in GUIDE_TOPICS.values() if f"\n## {h}\n" in RUNBOOK.read_text()]
    without = [h for h in top_level if h not in _sections_with_runnable_blocks()]
    assert without == []


def test_every_code_block_says_where_it_can_run() -> None:
    for block in runbook_blocks():
        if block.language in {"sh", "sql"}:
            assert block.tag in {"run", "cluster", "compose", "manual"}, f"line {block.line}: untagged {block.language}"
        if "kubectl" in block.body or "helm " in block.body:
            assert block.tag in {"cluster", "manual"}, f"line {block.line}: kubectl/helm in a '{block.tag}' block"
        if "docker compose" in block.body:
            assert block.tag == "compose", f"line {block.line}"


def test_runnable_blocks_use_scan_never_keys_or_flushes() -> None:
    for block in runbook_blocks():
        if block.tag == "run":
            assert not re.search(r"\b(KEYS|FLUSHALL|FLUSHDB)\b", block.body), f"line {block.line}"


def test_runbook_names_the_products_tables_keys_metrics_and_endpoints() -> None:
    text = RUNBOOK.read_text()
    for name in (
        "am_apis",
        "am_api_keys",
        "am_consumers",
        "am_subscriptions",
        "am_policies",
        "am_usage_records",
        "rate_limit:",
        "route_cache:version",
        "cache:api:key:",
        "usage:tenants",
        "api_requests_total",
        "api_request_duration_seconds",
        "/health",
        "/ready",
        "/metrics",
        "showmigrations",
        "sqlmigrate",
    ):
        assert name in text, name
    assert "alembic" in text  # says what replaces it


@pytest.fixture
def live_runbook_env(live_env: dict[str, str], tmp_path: Path) -> Any:
    """A gunicorn-served apimgmt with the demo loaded, and the environment an operator's shell would have."""
    env = {
        **live_env,
        # Strong values so `check --deploy` judges the configuration, not the test's development secrets.
        "SECRET_KEY": "runbook-test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
        "KEY_HASH_PEPPER": "runbook-test-pepper-0123456789-abcdefghijklmnop",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "BACKUP_DIR": str(tmp_path / "backups"),
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        # The metrics listener (gunicorn.conf.py), as in the image; the runbook reads it at $APIMGMT_METRICS_URL.
        "METRICS_PORT": str(metrics_port := free_port()),
        "METRICS_ADDRESS": "127.0.0.1",
        "APIMGMT_METRICS_URL": f"http://127.0.0.1:{metrics_port}",
        # A narrow terminal: tools that cut lines to its width (ps without -ww) must not lose what is grepped for
        # (CI's checkout path is longer than a workstation's, and `ps` cut "gunicorn" off at 80 columns there).
        "COLUMNS": "40",
    }
    for key in ("PROMETHEUS_MULTIPROC_DIR", "USAGE_SPOOL_DIR", "BACKUP_DIR"):
        Path(env[key]).mkdir()
    with wsgi_server(echo.app) as upstream:
        demo = subprocess.run(
            [sys.executable, "manage.py", "demo", "--json", "--upstream", upstream],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stderr
        credentials = json.loads(demo.stdout.strip().splitlines()[-1])
        env["API_KEY"] = credentials["api_key"]
        env["API_TOKEN"] = credentials["api_token"]
        with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as base_url:
            env["APIMGMT_URL"] = base_url
            yield env


def _run(block: Block, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if block.language == "sql":
        args = ["psql", env["DATABASE_URL"], "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    else:
        args = ["bash", "-e", "-o", "pipefail", "-c", block.body]
    return subprocess.run(
        args,
        input=block.body if block.language == "sql" else None,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runnable_runbook_commands_work_against_a_live_instance(live_runbook_env: dict[str, str]) -> None:
    env = live_runbook_env
    # Traffic first, so the keys and streams the runbook inspects exist, as they would in production.
    warm = subprocess.run(
        [
            "bash",
            "-c",
            'for i in 1 2 3; do curl -fsS -o /dev/null -H "X-API-Key: $API_KEY" "$APIMGMT_URL/demo/echo/get"; done',
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert warm.returncode == 0, warm.stderr
    blocks = [b for b in runbook_blocks() if b.tag == "run"]
    assert len(blocks) >= 25
    failures, outputs = [], {}
    for block in blocks:
        result = _run(block, env)
        outputs[block.line] = result.stdout
        if result.returncode != 0:
            failures.append(
                f"line {block.line} ({block.section}): exit {result.returncode}\n"
                f"{result.stdout[-800:]}\n{result.stderr[-1500:]}"
            )
    assert failures == [], "\n\n".join(failures)
    everything = "\n".join(outputs.values())
    # The commands showed what an operator needs to see, not just exited 0.
    assert '"status": "ok"' in everything  # /ready
    assert re.search(r"^api_requests_total\{", everything, re.M)
    assert re.search(r"^rate_limit:\{demo\}:", everything, re.M)
    assert re.search(r"(?i)^ratelimit-policy:", everything, re.M)
    assert "idx_usage_records_tenant_time" in everything
    assert "revoked key now gets 401" in everything
    assert "gateway: 200" in everything and "upstream: 200" in everything
