"""The usage flusher's compose healthcheck and Kubernetes liveness probe work against a real flusher process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings

from tests.deploy.conftest import ROOT, render
from tests.support.secrets_scan import register_log
from tests.support.servers import free_port, wait_for_port

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_PORT = "9100"


def _compose_flusher() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["flusher"]
    return service


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """Run the compose flusher healthcheck (its exec form) against `port` instead of the container's 9100."""
    test = _compose_flusher()["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    script = test[3].replace(f":{COMPOSE_PORT}/", f":{port}/")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=15)


@pytest.fixture
def flusher_without_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The compose flusher command through the image's entry point, its metrics on a free port; Redis unreachable."""
    port = free_port()
    command = _compose_flusher()["command"]
    assert command[-2:] == ["--metrics-port", COMPOSE_PORT]
    log = tmp_path / "flusher.log"
    register_log(log)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: Redis is "down"
        "SECRET_KEY": settings.SECRET_KEY,
        "KEY_HASH_PEPPER": settings.KEY_HASH_PEPPER,
        "DEBUG": "0",
        "ALLOWED_HOSTS": "localhost",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "HOME": str(tmp_path),
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(ROOT / "deploy" / "entrypoint.sh"), *command[:-1], str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout=30)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_flusher_healthcheck_and_liveness_pass_while_redis_is_down_and_fail_once_it_exits(
    flusher_without_redis: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, log = flusher_without_redis
    # A Redis outage must not get the flusher restarted in a loop: it retries by itself.
    checked = _healthcheck(port)
    assert checked.returncode == 0, checked.stderr + log.read_text()
    probe = _containers_probe()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=5) as response:
        body = response.read().decode()
    assert response.status == 200
    assert "apimgmt_usage_flusher_lag_seconds" in body
    deadline = time.monotonic() + 10
    while "usage flush failed" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "usage flush failed" in log.read_text()  # it really is running, and failing, without Redis
    assert _healthcheck(port).returncode == 0

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()
    assert _healthcheck(port).returncode != 0


def _containers_probe() -> dict[str, Any]:
    """The rendered chart's flusher liveness probe (httpGet)."""
    (deployment,) = [d for d in render() if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-flusher")]
    probe: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    assert probe["port"] == "metrics"
    return probe
