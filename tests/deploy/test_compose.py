"""docker-compose.yml, the Dockerfile, nginx.conf and the entry point, checked without a Docker engine (none runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT
from tests.support.servers import free_port, wait_for_port

COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("control", "gateway", "flusher", "deliverer")
SECRET_NAMES = re.compile(r"(SECRET|PASSWORD|PEPPER|TOKEN|DATABASE_URL|REDIS_URL)", re.I)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_every_part_of_the_product(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "postgres",
        "redis",
        "migrate",
        "control",
        "gateway",
        "flusher",
        "deliverer",
        "nginx",
        "echo",
    }


def test_redis_is_append_only_because_the_usage_stream_lives_there(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "control", "gateway", "flusher", "deliverer", "nginx", "echo"):
        check = services[name]["healthcheck"]
        assert not check.get("disable") and check["test"], name
    for name in ("control", "gateway"):
        assert "/ready" in " ".join(services[name]["healthcheck"]["test"])
    # The flusher serves no /health (it is not gunicorn): its check asks its metrics port.
    assert "127.0.0.1:9100/metrics" in " ".join(services["flusher"]["healthcheck"]["test"])
    assert "127.0.0.1:9100/metrics" in " ".join(services["deliverer"]["healthcheck"]["test"])  # the same, for events
    # The one-shot migration has none on purpose (the image's /health would fail).
    assert services["migrate"]["healthcheck"] == {"disable": True}
    assert services["flusher"]["restart"] == "unless-stopped"


def test_services_start_in_dependency_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    for name in APP_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        assert deps["redis"] == {"condition": "service_healthy"}, name
    assert services["nginx"]["depends_on"]["gateway"] == {"condition": "service_healthy"}
    assert services["nginx"]["depends_on"]["control"] == {"condition": "service_healthy"}


def test_each_service_runs_its_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["flusher"]["command"] == ["flush-usage", "--metrics-port", "9100"]
    for role in ("gateway", "control"):
        assert services[role]["command"] == [role]
        assert services[role]["environment"]["APIMGMT_ROLE"] == role
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    for service in services.values():
        word = (service.get("command") or [""])[0]
        if service.get("build"):
            assert f"  {word})" in entrypoint, f"entrypoint.sh has no '{word}' shortcut"


def _environment_items(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    items = []
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        pairs = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        items += [(name, k, str(v)) for k, v in pairs]
    return items


def test_compose_holds_no_secret_literals_they_come_from_the_env_file(compose: dict[str, Any]) -> None:
    for service, key, value in _environment_items(compose):
        if SECRET_NAMES.search(key):
            assert value.startswith("${"), f"{service}: {key} is a literal secret"
    for name in (*APP_SERVICES, "migrate", "postgres"):
        assert compose["services"][name]["env_file"] == [".env"], name
    text = COMPOSE.read_text()
    for line in (ROOT / ".env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#") and SECRET_NAMES.search(line.split("=", 1)[0]):
            assert line.split("=", 1)[1] not in text
    assert re.search(r"^\.env$", (ROOT / ".gitignore").read_text(), re.M), ".env must be git-ignored"


def test_env_example_names_every_required_setting_with_placeholders_only() -> None:
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    for key in ("SECRET_KEY", "KEY_HASH_PEPPER", "DATABASE_URL", "REDIS_URL", "POSTGRES_PASSWORD", "ALLOWED_HOSTS"):
        assert key in example
    for key in ("SECRET_KEY", "KEY_HASH_PEPPER", "POSTGRES_PASSWORD"):
        assert example[key].startswith("change-me"), f"{key} must be an obvious placeholder"
    assert example["POSTGRES_PASSWORD"] in example["DATABASE_URL"]
    assert len(example["KEY_HASH_PEPPER"]) >= 32 and example["KEY_HASH_PEPPER"] != example["SECRET_KEY"]


def test_nginx_buffers_slow_clients_and_routes_the_control_plane() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    for directive in ("proxy_request_buffering on;", "proxy_buffering on;", "server gateway:8000;"):
        assert directive in conf
    for prefix in ("/admin/", "/mgmt/", "/portal/"):
        assert re.search(rf"location {prefix} {{\s*proxy_pass http://apimgmt_control;", conf), prefix
    assert re.search(r"location / {\s*proxy_pass http://apimgmt_gateway;", conf)
    assert (
        "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"
        in yaml.safe_load(COMPOSE.read_text())["services"]["nginx"]["volumes"]
    )


def test_metrics_stay_off_the_public_port_in_nginx_compose_and_the_image(compose: dict[str, Any]) -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    # Exact and ^~ prefix locations win over `location /` whatever their order: /metrics never reaches an app.
    assert re.search(r"location = /metrics {\s*return 404;\s*}", conf)
    assert re.search(r"location \^~ /metrics/ {\s*return 404;\s*}", conf)
    assert ":9100" not in conf, "nginx must not proxy the metrics port"
    services = compose["services"]
    for name in ("gateway", "control"):
        assert services[name]["environment"]["METRICS_PORT"] == "9100"
    published = [p for service in services.values() for p in service.get("ports", [])]
    assert not [p for p in published if "9100" in str(p)], "the metrics port is never published"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "METRICS_PORT=9100" in dockerfile and re.search(r"^EXPOSE 8000 9100$", dockerfile, re.M)


def _final_stage(dockerfile: str) -> list[str]:
    lines = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert len(starts) >= 2, "the Dockerfile must be multi-stage"
    return lines[starts[-1] :]


def test_dockerfile_final_stage_is_slim_non_root_and_health_checked() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final = _final_stage(dockerfile)
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER (it would run as root)"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert not any("build-essential" in line or "gcc" in line for line in final), "build tools in the final image"
    health = next(line for line in final if line.upper().startswith("HEALTHCHECK"))
    assert "/health" in health
    assert any("collectstatic --noinput" in line for line in dockerfile.splitlines())
    assert 'CMD ["gunicorn", "apimgmt.wsgi:application", "--config", "gunicorn.conf.py"]' in final


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", "db.sqlite3"} <= ignored


def test_entrypoint_creates_writable_dirs_and_runs_the_given_command(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    result = subprocess.run(
        [str(ROOT / "deploy" / "entrypoint.sh"), "sh", "-c", "echo ran $0", "ok"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran ok"
    assert (tmp_path / "prom").is_dir() and (tmp_path / "spool").is_dir()


def test_entrypoint_echo_shortcut_serves_the_echo_upstream(tmp_path: Path) -> None:
    port = free_port()
    venv_bin = str(Path(shutil.which("gunicorn", path=str(ROOT / ".venv" / "bin")) or "gunicorn").parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "HOME": str(tmp_path),
    }
    proc = subprocess.Popen(
        [str(ROOT / "deploy" / "entrypoint.sh"), "echo", "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello?x=1", timeout=5) as response:
            body = yaml.safe_load(response.read())
        assert body["path"] == "/hello" and body["query"] == "x=1"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)


YAML_FILES = [
    "docker-compose.yml",
    "deploy/values-production.yaml",
    "deploy/yamllint.yaml",
    "charts/apimgmt/Chart.yaml",
    "charts/apimgmt/values.yaml",
    "charts/apimgmt/files/prometheus-rules.yaml",
    "monitoring/prometheus/rules.yml",
    "monitoring/prometheus/rules_test.yml",
]


def test_yamllint_is_clean_on_compose_and_the_charts_static_files() -> None:
    pytest.importorskip("yamllint", reason="yamllint is pinned in requirements-dev.txt")
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(ROOT / "deploy" / "yamllint.yaml"))
    problems = []
    for name in YAML_FILES:
        path = ROOT / name
        problems += [f"{name}:{p.line}: {p.message}" for p in linter.run(path.read_text(), conf, str(path))]
    assert problems == []


def test_every_chart_value_is_documented_on_the_line_above() -> None:
    lines = (ROOT / "charts" / "apimgmt" / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if re.match(r"^[A-Za-z_.\-/]+:", stripped) and not stripped.startswith("#"):
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                undocumented.append(f"line {i + 1}: {stripped}")
    assert undocumented == []
