"""The gateway under gunicorn with two workers: behaviour that crosses workers, and 1 GiB streamed both ways."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from apimgmt import services
from apimgmt.models import ApiKey
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import recording_upstream
from tests.support.servers import gunicorn

GIB = 1024**3


@pytest.fixture
def live_gateway(live_env, tmp_path) -> Iterator[str]:
    env = {
        **live_env,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "GATEWAY_WORKERS": "2",
    }
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
        yield url


def _until(predicate, timeout: float) -> float:
    """Seconds from now until the first call of ``predicate`` that came out true (measured at its start)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        attempt = time.monotonic()
        try:
            if predicate():
                return attempt - started
        except requests.RequestException:
            pass  # not yet: a worker still starting on a loaded machine may not answer within a request's timeout
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def _all_workers(session: requests.Session, url: str, headers: dict[str, str], want: int, n: int = 12) -> bool:
    """True when n requests in a row (spread over both workers by fresh connections) all answer ``want``."""
    return all(requests.get(url, headers=headers, timeout=5).status_code == want for _ in range(n))


def test_revocation_and_api_changes_reach_every_worker_within_one_second(live_gateway, acme, bob_app, bob_key):
    key_row, key = bob_key
    with recording_upstream() as upstream:
        api = publish(acme, upstream.url)
        subscribe(bob_app, api)
        url = live_gateway + "/api/users/v1/x"
        headers = {"X-API-Key": key}
        session = requests.Session()
        _until(lambda: _all_workers(session, url, headers, 200), 30)

        services.api_key_revoke(key=ApiKey.objects.get(pk=key_row.pk), actor=None)
        assert _until(lambda: _all_workers(session, url, headers, 401), 3) < 1.0

        _, new_key = services.api_key_create(consumer=bob_app, actor=None)
        headers = {"X-API-Key": new_key}
        _until(lambda: _all_workers(session, url, headers, 200), 5)
        services.api_retire(api=api, actor=None)
        assert _until(lambda: _all_workers(session, url, headers, 404), 3) < 1.0


def test_limit_of_100_admits_exactly_100_across_two_gunicorn_workers(live_gateway, acme, bob_app, bob_key):
    _, key = bob_key
    with recording_upstream() as upstream:
        policy = services.policy_create(
            tenant=acme, name="q", policy_type="quota", config={"requests_per_day": 100}, actor=None
        )
        api = publish(acme, upstream.url, policies=[policy])
        subscribe(bob_app, api)
        url = live_gateway + "/api/users/v1/x"
        statuses: list[int] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(50):
                status = requests.get(url, headers={"X-API-Key": key}, timeout=10).status_code
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count(200) == 100
        assert statuses.count(429) == 700
        assert len(upstream.seen) == 100


class _BigHandler(BaseHTTPRequestHandler):
    """GET /big answers 1 GiB generated on the fly; POST reads and discards the body, answering its length."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    chunk = b"x" * (1024 * 1024)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(GIB))
        self.end_headers()
        for _ in range(GIB // len(self.chunk)):
            self.wfile.write(self.chunk)

    def do_POST(self) -> None:
        remaining = int(self.headers["Content-Length"])
        received = 0
        while remaining:
            data = self.rfile.read(min(remaining, 1024 * 1024))
            if not data:
                break
            received += len(data)
            remaining -= len(data)
        body = str(received).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _worker_pids(port: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"gunicorn" in b" ".join(cmdline) and f"127.0.0.1:{port}".encode() in cmdline:
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            parent = (Path("/proc") / str(ppid) / "cmdline").read_bytes()
            if b"gunicorn" in parent:
                pids.append(int(entry.name))
    return pids


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_gib_streams_both_ways_without_growing_worker_memory(live_gateway, acme, bob_app, bob_key):
    _, key = bob_key
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BigHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = publish(acme, f"http://127.0.0.1:{server.server_port}", total_timeout=600, read_timeout=60)
        subscribe(bob_app, api)
        url = live_gateway + "/api/users/v1/big"
        headers = {"X-API-Key": key}
        _until(
            lambda: (
                requests.get(live_gateway + "/api/users/v1/small", headers=headers, timeout=5).status_code in (200, 501)
            ),
            30,
        )
        port = int(live_gateway.rsplit(":", 1)[1])
        pids = _worker_pids(port)
        assert len(pids) == 2
        before = {pid: _rss_kib(pid) for pid in pids}

        received = 0
        with requests.get(url, headers=headers, stream=True, timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(1024 * 1024):
                received += len(chunk)
        assert received == GIB

        class Upload:
            """1 GiB generated on the fly; its length makes requests send Content-Length, not chunks."""

            def __len__(self) -> int:
                return GIB

            def __iter__(self) -> Iterator[bytes]:
                block = b"y" * (1024 * 1024)
                for _ in range(GIB // len(block)):
                    yield block

        response = requests.post(url, headers=headers, data=Upload(), timeout=120)
        assert response.status_code == 200 and response.text == str(GIB)

        for pid in pids:
            growth_mib = (_rss_kib(pid, "VmHWM") - before[pid]) / 1024
            assert growth_mib < 50, f"worker {pid} grew by {growth_mib:.1f} MiB"
            assert _rss_kib(pid) / 1024 < 80
    finally:
        server.shutdown()
        server.server_close()


def test_responses_keep_their_framing_on_one_keep_alive_connection_under_gunicorn(live_gateway, acme, bob_app, bob_key):
    # gunicorn.conf.py installs the writer that sends the header block and a small body in one send
    # (gateway/gunicorn_response.py): answers of every shape must still parse one after another on one connection.
    from tests.gateway.upstreams import Answer

    _, key = bob_key
    with recording_upstream() as upstream:
        by_path = {
            "/small": Answer(body=b'{"ok": true}'),
            "/empty": Answer(body=b""),
            "/204": Answer(status=204, body=b""),
            "/big": Answer(headers=[("Content-Type", "application/octet-stream")], body=b"b" * 300_000),
        }
        upstream.respond = lambda seen: by_path.get(seen.path.split("?")[0], Answer(body=b"echo:" + seen.body))
        api = publish(acme, upstream.url, strip_path=True)
        subscribe(bob_app, api)
        base = live_gateway + "/api/users/v1"
        headers = {"X-API-Key": key}
        _until(lambda: requests.get(base + "/small", headers=headers, timeout=5).status_code == 200, 30)
        session = requests.Session()
        for _ in range(2):
            assert session.get(base + "/small", headers=headers, timeout=5).content == b'{"ok": true}'
            assert session.get(base + "/empty", headers=headers, timeout=5).content == b""
            assert session.get(base + "/204", headers=headers, timeout=5).status_code == 204
            head = session.head(base + "/small", headers=headers, timeout=5)
            assert head.status_code == 200 and head.content == b""
            assert session.get(base + "/big", headers=headers, timeout=5).content == b"b" * 300_000

            def chunks() -> Iterator[bytes]:  # no length: requests sends it chunked, gunicorn de-chunks it
                yield b"part-1,"
                yield b"part-2"

            response = session.post(base + "/upload", headers=headers, data=chunks(), timeout=5)
            assert response.status_code == 200 and response.content == b"echo:part-1,part-2"


def test_key_cache_expiring_under_load_neither_exhausts_the_database_pool_nor_fails_requests(
    live_env, acme, bob_app, bob_key, tmp_path
):
    # Production settings: pooled connections (2 here), gevent workers, a key cache that expires every second.
    # Every expiry finds many requests in flight; each must neither keep a pooled connection (the gateway never
    # reaches Django's request_finished) nor wait for the pool's timeout: all answers stay 200.
    _, key = bob_key
    env = {
        **live_env,
        "DB_POOL": "1",
        "DB_POOL_SIZE": "2",
        "DB_POOL_TIMEOUT": "2",
        "GATEWAY_AUTH_CACHE_SECONDS": "1",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    with recording_upstream() as upstream, gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as base:
        api = publish(acme, upstream.url)
        subscribe(bob_app, api)
        url = base + "/api/users/v1/x"
        _until(lambda: requests.get(url, headers={"X-API-Key": key}, timeout=5).status_code == 200, 30)
        statuses: list[int] = []
        lock = threading.Lock()
        stop = time.monotonic() + 3.5  # three cache expiries

        def client() -> None:
            session = requests.Session()
            while time.monotonic() < stop:
                status = session.get(url, headers={"X-API-Key": key}, timeout=10).status_code
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
