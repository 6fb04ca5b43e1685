"""Real servers for tests: loopback upstreams (threaded WSGI) and the app under gunicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Callable[..., Any]) -> Iterator[str]:
    """Serve a WSGI app on a free loopback port in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def app_server_env() -> dict[str, str]:
    """Environment for an app server subprocess that uses this test run's database and Redis.

    Call it once the test database exists (in a test, or a fixture after ``django_db_setup``); the server sees
    only committed rows, so the tests that talk to it use ``transactional_db``.
    """
    from django.conf import settings
    from django.db import connection

    db = settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    name = connection.settings_dict["NAME"]
    return {
        "DATABASE_URL": f"postgres://{user}@{host}:{port}/{name}",
        "REDIS_URL": settings.REDIS_URL or "",
        "KEY_HASH_PEPPER": settings.KEY_HASH_PEPPER,
        "SECRET_KEY": settings.SECRET_KEY,
        "DEBUG": "0",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "ALLOWED_HOSTS": "*",
        "DB_POOL": "0",
    }


@contextmanager
def gunicorn(
    env: dict[str, str],
    *,
    app: str = "apimgmt.wsgi:application",
    workers: int = 2,
    extra_args: list[str] | None = None,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run the app under gunicorn (our gunicorn.conf.py when present) on a free port; yields the base URL."""
    port = free_port()
    full_env = {**os.environ, **env}
    args = [str(VENV_BIN / "gunicorn"), app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    conf = ROOT / "gunicorn.conf.py"
    if conf.exists() and app.startswith("apimgmt.wsgi"):
        args += ["--config", str(conf)]
    args += extra_args or []
    if log_path is None:
        # Always captured: the suite scans every server log for leaked secrets (tests/conftest.py).
        from tests.support.secrets_scan import SERVER_LOG_DIR

        log_path = SERVER_LOG_DIR / f"gunicorn-{port}.log"
    else:
        from tests.support.secrets_scan import register_log

        register_log(log_path)
    out = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
