"""The production install: a venv made from requirements.txt alone (what the Dockerfile installs, no dev tools)
checks clean, migrates a fresh database, serves API traffic under gunicorn with the repository's gunicorn.conf.py
(the production worker class), serves the control plane and flushes usage.

The venv is cached by the lock file's hash (and the Python version) outside the work tree, so a CI run on the same
machine reuses it: ~/.cache/apimgmt/production-venv-<hash> (APIMGMT_VENV_CACHE moves it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import requests

from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.secrets_scan import register_log
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.txt"
PRODUCTION_WORKER = "gateway.gunicorn_worker.GatewayWorker"


def _cache_dir() -> Path:
    configured = os.environ.get("APIMGMT_VENV_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apimgmt"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a production process: nothing that points Python at the dev venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def venv() -> Path:
    """A venv with requirements.txt and nothing else, built once per lock file and Python version."""
    key = hashlib.sha256(LOCK.read_bytes() + f"{sys.version_info[:3]}".encode()).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"production-venv-{key}"
    complete = path / ".complete"
    with open(cache / f"production-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: one builds, the other waits and reuses it
        if not complete.exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that was interrupted
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
            # No --require-hashes here: a lock without hashes must fail on what it lacks, not on the flag.
            installed = subprocess.run(
                [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(LOCK)],
                env=_clean_env(),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert installed.returncode == 0, installed.stdout + installed.stderr
            complete.touch()
    return path


def _run(venv: Path, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A new, empty PostgreSQL database next to the suite's; dropped afterwards."""
    base = urlsplit(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/test")
    name = f"apimgmt_prodinstall_{uuid.uuid4().hex[:10]}"
    admin_url = base._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def app_env(database: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Production settings (DEBUG off) for every process of the install."""
    state = tmp_path_factory.mktemp("production")
    for directory in ("spool", "prometheus"):  # deploy/entrypoint.sh makes these in the image
        (state / directory).mkdir()
    return _clean_env(
        DEBUG="0",
        DATABASE_URL=database,
        REDIS_URL=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/9",
        SECRET_KEY="production-install-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFG",
        KEY_HASH_PEPPER="production-install-test-pepper-0123456789abcdefghijklmnopqrstuvwxyz",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        UPSTREAM_ALLOW_PRIVATE="1",
        USAGE_SPOOL_DIR=str(state / "spool"),
        PROMETHEUS_MULTIPROC_DIR=str(state / "prometheus"),
        GUNICORN_WORKERS="1",
    )


@pytest.fixture(scope="module")
def migrated(venv: Path, app_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    migrate = _run(venv, "manage.py", "migrate", "--noinput", env=app_env)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    return migrate


@dataclass
class Served:
    base: str
    metrics_url: str


@contextmanager
def _gunicorn(venv: Path, env: dict[str, str], log: Path) -> Iterator[Served]:
    """The image's command: gunicorn apimgmt.wsgi:application --config gunicorn.conf.py (bound to loopback), with
    the metrics listener on a port of its own, as the image's METRICS_PORT has it."""
    port, metrics_port = free_port(), free_port()
    register_log(log)  # the suite scans every server log for leaked secrets
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "gunicorn"), "apimgmt.wsgi:application", "--config", "gunicorn.conf.py"],
            cwd=ROOT,
            env={
                **env,
                "GUNICORN_BIND": f"127.0.0.1:{port}",
                "METRICS_PORT": str(metrics_port),
                "METRICS_ADDRESS": "127.0.0.1",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:  # until a worker answers; a gunicorn that exits (a worker class that fails) fails at once
                assert proc.poll() is None, f"gunicorn exited:\n{log.read_text()[-4000:]}"
                try:
                    if requests.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, f"gunicorn never answered /health:\n{log.read_text()[-4000:]}"
                time.sleep(0.2)
            yield Served(base, f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            with suppress(ProcessLookupError):  # graceful: workers send their buffered usage events on exit
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass
class GatewayRun:
    demo: dict[str, str] = field(repr=False)  # credentials: never in a failure message
    upstream: Recorder
    good: requests.Response
    post: requests.Response
    bad_key: requests.Response
    public_metrics: requests.Response
    scraped: requests.Response
    log: str
    flush: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def gateway_run(
    venv: Path, app_env: dict[str, str], migrated: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayRun]:
    """The gateway role as the image runs it, in front of a loopback upstream, with the demo's real key."""
    log = tmp_path_factory.mktemp("gateway-log") / "gunicorn.log"
    with recording_upstream() as upstream:
        demo = _run(venv, "manage.py", "demo", "--json", "--upstream", upstream.url, env=app_env)
        assert demo.returncode == 0, demo.stderr
        credentials = json.loads(demo.stdout)
        with _gunicorn(venv, {**app_env, "APIMGMT_ROLE": "gateway"}, log) as served:
            url = f"{served.base}{credentials['api_base_path']}/hello?x=1"
            key = {"X-API-Key": credentials["api_key"]}
            good = requests.get(url, headers=key, timeout=30)
            post = requests.post(url, headers=key, data=b'{"n": 1}', timeout=30)
            bad_key = requests.get(url, headers={"X-API-Key": "ak_live_" + "x" * 38}, timeout=30)
            public_metrics = requests.get(f"{served.base}/metrics", timeout=30)
            scraped = requests.get(served.metrics_url, timeout=30)
        # Right after the gateway stopped (its workers sent their usage events on the way out), and before the next
        # test empties Redis: the flusher, once.
        flush = _run(venv, "manage.py", "flush_usage", env=app_env)
        yield GatewayRun(credentials, upstream, good, post, bad_key, public_metrics, scraped, log.read_text(), flush)


def test_production_venv_has_a_consistent_closure_and_no_dev_tools(venv: Path) -> None:
    checked = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], env=_clean_env(), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    dev_tool = _run(venv, "-c", "import pytest", env=_clean_env())
    assert dev_tool.returncode != 0, "the production venv must not contain the dev requirements"


def test_production_worker_class_imports(venv: Path) -> None:
    imported = _run(venv, "-c", f"import {PRODUCTION_WORKER.rsplit('.', 1)[0]}", env=_clean_env())
    assert imported.returncode == 0, imported.stderr


def test_migrate_builds_a_fresh_database(migrated: subprocess.CompletedProcess[str], database: str) -> None:
    assert "Applying apimgmt.0001" in migrated.stdout
    with psycopg.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"am_tenants", "am_apis", "am_api_keys", "am_usage_records"} <= tables


def test_gateway_proxies_a_request_with_a_real_key(gateway_run: GatewayRun) -> None:
    assert f"Using worker: {PRODUCTION_WORKER}" in gateway_run.log
    assert gateway_run.good.status_code == 200, gateway_run.good.text
    assert gateway_run.good.json() == {"ok": True}
    assert gateway_run.post.status_code == 200, gateway_run.post.text
    assert gateway_run.bad_key.status_code == 401
    seen = gateway_run.upstream.seen
    assert [s.method for s in seen] == ["GET", "POST"]
    assert all(s.path.endswith("/hello?x=1") for s in seen)
    assert seen[1].body == b'{"n": 1}'
    assert "x-api-key" not in {name.lower() for name in seen[0].headers}, "the key never reaches the upstream"


def test_control_role_serves_the_admin_login(
    venv: Path, app_env: dict[str, str], migrated: object, tmp_path: Path
) -> None:
    with _gunicorn(venv, {**app_env, "APIMGMT_ROLE": "control"}, tmp_path / "control.log") as served:
        login = requests.get(f"{served.base}/admin/login/", timeout=30)
        log = (tmp_path / "control.log").read_text()

    assert login.status_code == 200, login.text[:2000]
    assert 'name="password"' in login.text
    assert f"Using worker: {PRODUCTION_WORKER}" in log


def test_flush_usage_turns_the_gateways_events_into_rows(gateway_run: GatewayRun, database: str) -> None:
    assert gateway_run.flush.returncode == 0, gateway_run.flush.stdout + gateway_run.flush.stderr
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT status_code, key_id <> '', SUM(request_count)::int FROM am_usage_records"
            " WHERE tenant_id = 'demo' GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    # The two requests with the demo key, billed to it; the unknown key's request to the API, billed to no key.
    assert rows == [(200, True, 2), (401, False, 1)]


def test_deliver_events_runs_once_with_the_production_install(
    venv: Path, app_env: dict[str, str], gateway_run: GatewayRun
) -> None:
    """The event deliverer (webhooks) is a role of the image too: one round runs on the runtime lock alone."""
    deliver = _run(venv, "manage.py", "deliver_events", env=app_env)
    assert deliver.returncode == 0, deliver.stdout + deliver.stderr
    assert "Traceback" not in deliver.stdout + deliver.stderr


def test_gateway_metrics_are_on_their_own_port_only(gateway_run: GatewayRun) -> None:
    assert gateway_run.public_metrics.status_code == 404
    assert "api_requests_total" not in gateway_run.public_metrics.text
    assert gateway_run.scraped.status_code == 200
    assert 'api_requests_total{api="' in gateway_run.scraped.text
