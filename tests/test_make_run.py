"""`make run`'s script: from an empty database to a working gateway call, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from tests.support.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_database() -> str:
    db = settings.DATABASES["default"]
    if "postgresql" not in db["ENGINE"]:
        pytest.skip("needs PostgreSQL")
    name = f"{db['NAME']}_make_run"
    admin_url = f"postgresql://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{admin_url}/{name}"
    with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _as_from_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: a shell started with SIGINT ignored (a test run launched in the background
    by a non-interactive shell passes that on) can never trap it, and would only stop on its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_make_run_serves_the_demo_and_stops_on_ctrl_c_without_errors(empty_database: str, tmp_path: Path) -> None:
    port, echo_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO"))},
        "DATABASE_URL": empty_database,
        "REDIS_URL": settings.REDIS_URL or "",
        "PORT": str(port),
        "ECHO_PORT": str(echo_port),
        "METRICS_PORT": str(metrics_port),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_as_from_a_terminal,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        wait_for_port(port)
        wait_for_port(echo_port)
        text = log.read_text()
        key = re.search(r"Demo API key:\s+(ak_live_\w+)", text).group(1)  # type: ignore[union-attr]
        assert re.search(r"Admin:\s+http://127\.0\.0\.1:\d+/admin/\s+\(user admin, password \S+\)", text)
        assert f"echo upstream on 127.0.0.1:{echo_port}" in text
        request = urllib.request.Request(f"http://127.0.0.1:{port}/demo/echo/hello?x=1", headers={"X-API-Key": key})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        assert response.status == 200
        assert body["path"] == "/hello" and body["query"] == "x=1"
        assert key not in json.dumps(body["headers"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        # Metrics on their own port, as printed; never on the port clients reach.
        assert f"Metrics:        http://127.0.0.1:{metrics_port}/metrics" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"api_requests_total" in response.read()
        with pytest.raises(urllib.error.HTTPError) as public:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert public.value.code == 404
        # The background roles run beside the servers: the event deliverer, and the usage flusher with Redis.
        session = subprocess.run(
            ["ps", "-ww", "-s", str(proc.pid), "-o", "args="], capture_output=True, text=True, check=True
        ).stdout
        assert "manage.py deliver_events --follow" in session, session
        if settings.REDIS_URL:
            assert "manage.py flush_usage --follow" in session, session
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # What was still running, and where it waited: the failure then says what did not stop.
            tree = subprocess.run(
                ["ps", "-ww", "-e", "-o", "pid,ppid,sid,stat,wchan:24,args"], capture_output=True, text=True
            ).stdout
            os.killpg(proc.pid, signal.SIGKILL)
            mine = [line for line in tree.splitlines() if str(proc.pid) in line.split()[:3]]
            pytest.fail(
                "make run did not stop within 30 s of Ctrl-C\n"
                + "\n".join(mine)
                + "\n--- run.log ---\n"
                + log.read_text(errors="replace")[-3000:]
            )
    for p in (port, echo_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=2)
    # Nothing went wrong, so a first-time user must not see an error: no ERROR line, no traceback.
    text = log.read_text(errors="replace")
    assert "stopping…" in text
    # No gunicorn control socket: it would take over $HOME/.gunicorn/gunicorn.ctl from any other gunicorn around.
    assert "Control socket" not in text
    problems = [line for line in text.splitlines() if "ERROR" in line or line.startswith("Traceback")]
    assert not problems, text
