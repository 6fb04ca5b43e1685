"""docker-compose's nginx (deploy/nginx.conf), run for real on loopback: /metrics never reaches an app, the rest is
routed as before, WebSocket upgrades pass and streams are not buffered. nginx comes from Debian's package (apt-get
download + dpkg -x into a cache, never installed)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("APIMGMT_TEST_CACHE", Path.home() / ".cache" / "apimgmt-tests")) / "nginx-deb"


def _nginx_binary() -> Path:
    for found in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if found and os.access(found, os.X_OK):
            return Path(found)
    binary = CACHE_DIR / "root" / "usr" / "sbin" / "nginx"
    if binary.exists():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as download:
        os.chmod(download, 0o777)  # apt's sandbox user writes the download
        fetched = subprocess.run(["apt-get", "download", "nginx"], cwd=download, capture_output=True, text=True)
        debs = list(Path(download).glob("nginx_*.deb"))
        if fetched.returncode != 0 or not debs:
            pytest.skip(f"nginx unavailable: `apt-get download nginx` failed: {fetched.stderr.strip()[:300]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(CACHE_DIR / "root")], check=True, timeout=120)
    return binary


@dataclass
class Front:
    url: str
    gateway: Recorder
    control: Recorder


def _conf_for_loopback(port: int, gateway: int, control: int, workdir: Path) -> str:
    """deploy/nginx.conf with the compose network's names and paths swapped for loopback ones; nothing else."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    swaps = {
        "include /etc/nginx/mime.types;": "",  # only file types of static files, not under test here
        "pid /tmp/nginx.pid;": f"pid {workdir}/nginx.pid;",
        "server gateway:8000;": f"server 127.0.0.1:{gateway};",
        "server control:8000;": f"server 127.0.0.1:{control};",
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "alias /srv/static/;": f"alias {workdir}/static/;",
    }
    for old, new in swaps.items():
        assert old in conf, f"deploy/nginx.conf no longer has {old!r}: update this test"
        conf = conf.replace(old, new)
    # Debian's build keeps its temp files under /var/lib/nginx, which the extracted package does not create.
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return conf.replace("http {\n", "http {\n" + temp_paths, 1)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    with (
        recording_upstream() as gateway,
        recording_upstream() as control,
        _nginx(tmp_path, gateway.port, control.port) as url,
    ):
        yield Front(url, gateway, control)


@contextmanager
def _nginx(tmp_path: Path, gateway_port: int, control_port: int) -> Iterator[str]:
    """deploy/nginx.conf running on loopback in front of these ports; yields its base URL."""
    nginx = _nginx_binary()
    port = free_port()
    (tmp_path / "static").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(_conf_for_loopback(port, gateway_port, control_port, tmp_path))
    tested = subprocess.run(
        [str(nginx), "-t", "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(conf)], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stderr
    log = open(tmp_path / "nginx.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(nginx), "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(conf), "-g", "daemon off; user root;"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "nginx.log").read_text()
            try:
                requests.get(f"{url}/nginx-health", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize(
    "path", ["/metrics", "/metrics/", "/metrics?name[]=api_requests_total", "/%6Detrics", "/metrics/x"]
)
def test_nginx_answers_metrics_itself_and_forwards_nothing(front: Front, path: str) -> None:
    response = requests.get(f"{front.url}{path}", timeout=10)

    assert response.status_code == 404
    assert front.gateway.seen == [] and front.control.seen == []


def test_nginx_still_routes_api_traffic_and_the_control_plane(front: Front) -> None:
    for path in ("/demo/echo/hello", "/metricsfoo/v1", "/health", "/admin/login/", "/portal/demo/"):
        assert requests.get(f"{front.url}{path}", timeout=10).status_code == 200, path

    assert [s.path for s in front.gateway.seen] == ["/demo/echo/hello", "/metricsfoo/v1", "/health"]
    assert [s.path for s in front.control.seen] == ["/admin/login/", "/portal/demo/"]
    assert re.fullmatch(r"[0-9a-f]{32}", front.gateway.seen[0].headers["x-request-id"])


def test_nginx_passes_websocket_upgrades_to_the_gateway(tmp_path: Path) -> None:
    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, compression=None) as gateway, recording_upstream() as control:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        with (
            _nginx(tmp_path, gateway.socket.getsockname()[1], control.port) as url,
            connect(url.replace("http://", "ws://") + "/api/chat", proxy=None, open_timeout=10) as ws,
        ):
            ws.send("through nginx")
            assert ws.recv(timeout=5) == "through nginx"
            ws.send(b"\x00" * 100_000)
            assert ws.recv(timeout=5) == b"\x00" * 100_000
        gateway.shutdown()


class _Events(BaseHTTPRequestHandler):
    """Three server-sent events 0.5 s apart, marked unbuffered as the gateway marks streams."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        for number in range(3):
            event = f"data: {number} {time.time():.6f}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(0.5)
        self.wfile.write(b"0\r\n\r\n")


def test_nginx_passes_each_event_of_a_stream_on_at_once(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Events)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with (
            recording_upstream() as control,
            _nginx(tmp_path, server.server_address[1], control.port) as url,
            requests.get(url + "/api/events", stream=True, timeout=10) as response,
        ):
            assert "x-accel-buffering" not in response.headers  # nginx's own instruction, not the client's
            delays = []
            buffer = b""
            for data in response.iter_content(chunk_size=None):
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    delays.append(time.time() - float(event.split()[2]))
        assert len(delays) == 3
        assert max(delays) < 0.2, delays
    finally:
        server.shutdown()
        server.server_close()
