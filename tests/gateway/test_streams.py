"""Long-lived responses through the gateway under gunicorn: SSE past the total deadline, each event passed on at once."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gateway.conftest import publish, subscribe
from tests.support.servers import gunicorn

_EVENT = re.compile(rb"data: (\d+) (\d+\.\d+)\n\n")


class _SseHandler(BaseHTTPRequestHandler):
    """GET /svc/events?n=N&gap=G[&pause_after=K&pause=P]: N events G s apart, each carrying its number and send
    time; chunked, or delimited by the end of the connection with ?framing=close.

    GET /svc/poll?wait=W: a long poll, answered after W s with one event and a Content-Length."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = dict(part.split("=", 1) for part in self.path.partition("?")[2].split("&") if "=" in part)
        if self.path.startswith("/svc/poll"):
            time.sleep(float(query.get("wait", "1")))
            body = f"data: 1 {time.time():.6f}\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return
        count, gap = int(query.get("n", "1")), float(query.get("gap", "1"))
        pause_after, pause = int(query.get("pause_after", "0")), float(query.get("pause", "0"))
        chunked = query.get("framing") != "close"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            for number in range(1, count + 1):
                event = f"data: {number} {time.time():.6f}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
                self.wfile.flush()
                if number < count:
                    time.sleep(pause if number == pause_after else gap)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the gateway cut the stream


@pytest.fixture
def sse_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SseHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def live_gateway(live_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    env = {
        **live_env,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "GATEWAY_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
        yield url


def _read_events(
    base_url: str, target: str, key: str, limit: float
) -> tuple[list[tuple[int, float, float]], float, bytes]:
    """GET ``target`` over a plain socket; (number, sent, arrived) of each event as its bytes arrive, the time the
    response ended (the gateway closed it or finished it) and the response head."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=limit)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n".encode())
    received = b""
    events: list[tuple[int, float, float]] = []
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        arrived = time.time()
        received += data
        for match in _EVENT.finditer(received):
            number = int(match[1])
            if number > len(events):
                events.append((number, float(match[2]), arrived))
    sock.close()
    return events, time.monotonic() - started, received.partition(b"\r\n\r\n")[0]


def _publish_when_routable(
    acme: Any, bob_app: Any, key: str, gateway: str, upstream: str, total_timeout: float = 3.0, **options: Any
) -> None:
    api = publish(acme, upstream + "/svc", total_timeout=total_timeout, **options)
    subscribe(bob_app, api)
    started = time.monotonic()
    while True:
        try:
            answer = requests.get(gateway + "/api/users/v1/events?n=1", headers={"X-API-Key": key}, timeout=5)
            if answer.status_code == 200:
                return
        except requests.RequestException:
            pass  # a cold worker on a loaded machine: ask again
        assert time.monotonic() - started < 30, "the API never became routable"
        time.sleep(0.1)


def test_sse_of_90_s_runs_past_a_30_s_total_deadline_with_each_event_passed_on_within_100_ms(
    live_gateway, acme, bob_app, bob_key, sse_upstream
):
    # The issue's own scenario: one event a second for 90 s, through an API whose total deadline is 30 s.
    _, key = bob_key
    _publish_when_routable(acme, bob_app, key, live_gateway, sse_upstream, total_timeout=30.0, stream_timeout=5.0)
    events, lasted, head = _read_events(live_gateway, "/api/users/v1/events?n=90&gap=1", key, limit=120)
    assert b"\r\nX-Accel-Buffering: no" in head  # an nginx in front passes each event on at once too
    assert [number for number, _, _ in events] == list(range(1, 91))
    delays = [arrived - sent for _, sent, arrived in events]
    late = [(number, round(delay, 3)) for (number, _, _), delay in zip(events, delays, strict=True) if delay >= 0.1]
    assert not late, f"events held back 100 ms or more (event, seconds): {late}"
    assert lasted > 88


def test_a_long_poll_answer_passes_on_as_soon_as_the_upstream_sends_it(
    live_gateway, acme, bob_app, bob_key, sse_upstream
):
    # Long polling: the upstream holds the request, then answers with a length; nothing waits for more.
    _, key = bob_key
    _publish_when_routable(acme, bob_app, key, live_gateway, sse_upstream)
    events, lasted, head = _read_events(live_gateway, "/api/users/v1/poll?wait=2", key, limit=10)
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nContent-Length: " in head
    assert [number for number, _, _ in events] == [1]
    assert events[0][2] - events[0][1] < 0.1
    assert 1.9 < lasted < 3


def test_a_stream_without_a_length_in_close_framing_also_passes_event_by_event(
    live_gateway, acme, bob_app, bob_key, sse_upstream
):
    _, key = bob_key
    _publish_when_routable(acme, bob_app, key, live_gateway, sse_upstream, stream_timeout=2.0)
    events, _, _ = _read_events(live_gateway, "/api/users/v1/events?n=5&gap=1&framing=close", key, limit=20)
    assert [number for number, _, _ in events] == list(range(1, 6))
    assert max(arrived - sent for _, sent, arrived in events) < 0.1


def test_without_stream_timeout_the_total_deadline_still_ends_a_stream(
    live_gateway, acme, bob_app, bob_key, sse_upstream
):
    _, key = bob_key
    _publish_when_routable(acme, bob_app, key, live_gateway, sse_upstream)
    events, lasted, head = _read_events(live_gateway, "/api/users/v1/events?n=8&gap=1", key, limit=20)
    assert b"X-Accel-Buffering" not in head
    assert 2 <= len(events) <= 4  # the events of the first 3 s
    assert 2.5 < lasted < 5


def test_a_stream_silent_for_longer_than_stream_timeout_is_cut(live_gateway, acme, bob_app, bob_key, sse_upstream):
    _, key = bob_key
    _publish_when_routable(acme, bob_app, key, live_gateway, sse_upstream, stream_timeout=1.0)
    events, lasted, _ = _read_events(
        live_gateway, "/api/users/v1/events?n=6&gap=0.3&pause_after=3&pause=5", key, limit=20
    )
    assert [number for number, _, _ in events] == [1, 2, 3]
    assert 1.3 < lasted < 3.5  # 0.6 s of events, then cut about 1 s into the silence
