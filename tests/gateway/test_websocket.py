"""WebSocket through the gateway under gunicorn (two workers), with the `websockets` library as client and upstream."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from apimgmt import services
from apimgmt import usage_buckets as contract
from apimgmt.models import Api, ApiKey
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import recording_upstream, self_signed_certificate
from tests.support.servers import gunicorn


class WsUpstream:
    """A real WebSocket server on loopback: /echo echoes, /close-first closes (4000) after the first message,
    /die drops the TCP connection after the first message, /bad-text answers with text that is not UTF-8. Every
    handshake's path and headers are kept, and the close code each connection ended with."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.handshakes: list[tuple[str, dict[str, str], str | None]] = []
        self.closes: list[int | None] = []  # the close code each connection ended with
        self.server: Server = serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=tls,
            subprotocols=["chat"],
            select_subprotocol=self._select,
            compression=None,
            ping_interval=None,
        )
        self.port = self.server.socket.getsockname()[1]
        self.url = f"https://localhost:{self.port}" if tls else f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _select(connection: ServerConnection, offered: Any) -> Any:
        return "chat" if "chat" in offered else None

    def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        self.handshakes.append((request.path, {k.lower(): v for k, v in request.headers.raw_items()}, ws.subprotocol))
        path = request.path.split("?", 1)[0]
        if path.endswith("/greet"):
            ws.send("welcome")  # unasked, right behind the handshake
        try:
            for message in ws:
                if path.endswith("/close-first"):
                    ws.close(4000, "upstream says bye")
                    return
                if path.endswith("/die"):
                    ws.socket.shutdown(socket.SHUT_RDWR)
                    ws.socket.close()
                    return
                if path.endswith("/bad-text"):
                    ws.socket.sendall(b"\x81\x02\xff\xfe")  # a whole text frame that is not UTF-8
                    continue
                ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append(ws.close_code)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    upstream = WsUpstream()
    yield upstream
    upstream.stop()


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
        yield url.replace("http://", "ws://")


def _ws_api(tenant: Any, consumer: Any, upstream_url: str, **options: Any) -> Api:
    api = publish(tenant, upstream_url + "/svc", websocket=True, **options)
    subscribe(consumer, api)
    return api


def _connect(url: str, key: str | None = None, **kwargs: Any) -> ClientConnection:
    headers = {"X-API-Key": key} if key else None
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 5)
    return connect(url, additional_headers=headers, proxy=None, ping_interval=None, legacy=True, **kwargs)


def _wait_routable(url: str, key: str, timeout: float = 30) -> None:
    """Until both workers have loaded the API (a handshake succeeds several times in a row)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            for _ in range(6):
                with _connect(url, key):
                    pass
            return
        except (InvalidStatus, OSError):
            time.sleep(0.1)
    raise AssertionError("the API never became routable")


def _closed_with(ws: ClientConnection, timeout: float = 5) -> tuple[int, str, float]:
    """Wait for the connection to close; (code, reason, seconds waited)."""
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as caught:
        ws.recv(timeout=timeout)
    frame = caught.value.rcvd
    assert frame is not None, "closed without a close frame"
    return frame.code, frame.reason, time.monotonic() - started


# -- protocol ------------------------------------------------------------------------------------------------------


def test_text_binary_fragmented_messages_and_ping_pass_both_ways(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    with _connect(url, key) as ws:
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\x01\xff" * 1000)
        assert ws.recv(timeout=5) == b"\x00\x01\xff" * 1000
        ws.send(["frag", "mented ", "text"])  # one message in three frames
        assert ws.recv(timeout=5) == "fragmented text"
        ws.send([b"a" * 70_000, b"b" * 70_000])
        assert ws.recv(timeout=5) == b"a" * 70_000 + b"b" * 70_000
        pong = ws.ping(b"are you there")
        assert pong.wait(5), "no pong came back through the gateway"
        ws.close(1000, "done here")
    assert ws.close_code == 1000
    path, headers, _ = ws_upstream.handshakes[-1]
    assert path == "/svc/echo"
    assert headers["x-consumer-id"] == bob_app.id
    assert headers["x-tenant-id"] == acme.id


def test_client_close_reaches_upstream_and_upstream_close_reaches_client(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    _wait_routable(live_gateway + "/api/users/v1/echo", key)
    with _connect(live_gateway + "/api/users/v1/close-first", key) as ws:
        ws.send("hi")
        code, reason, _ = _closed_with(ws)
    assert (code, reason) == (4000, "upstream says bye")

    ws = _connect(live_gateway + "/api/users/v1/echo", key)
    ws.close(4001, "client says bye")
    assert ws.close_code == 4001  # the upstream's answer to our close came back through the gateway


def test_a_greeting_the_upstream_sends_right_after_the_handshake_arrives_unasked(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/greet"
    _wait_routable(url, key)
    for _ in range(5):
        with _connect(url, key) as ws:
            assert ws.recv(timeout=5) == "welcome"


def test_subprotocol_is_negotiated_with_the_upstream(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    with _connect(url, key, subprotocols=["other", "chat"]) as ws:
        assert ws.subprotocol == "chat"


# -- upstream failures ---------------------------------------------------------------------------------------------


def test_upstream_that_refuses_the_upgrade_gets_502(live_gateway, acme, bob_app, bob_key):
    _, key = bob_key
    with recording_upstream() as plain:  # an HTTP server: answers 200, never 101
        _ws_api(acme, bob_app, plain.url)
        url = live_gateway + "/api/users/v1/echo"
        http_url = url.replace("ws://", "http://")
        deadline = time.monotonic() + 30
        while True:  # until both workers route it (a busy machine may not answer a request within its timeout)
            try:
                if requests.get(http_url, headers={"X-API-Key": key}, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the API never became routable"
            time.sleep(0.1)
        with pytest.raises(InvalidStatus) as caught:
            _connect(url, key)
    response = caught.value.response
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    assert b"refused the WebSocket upgrade" in response.body


def test_upstream_dying_mid_stream_closes_the_client_with_1011(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    _wait_routable(live_gateway + "/api/users/v1/echo", key)
    with _connect(live_gateway + "/api/users/v1/die", key) as ws:
        ws.send("hi")
        code, reason, _ = _closed_with(ws)
    assert code == 1011
    assert "upstream" in reason


def test_text_from_the_upstream_that_is_not_utf8_is_not_passed_on_and_closes_both_sides_with_1007(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    _wait_routable(live_gateway + "/api/users/v1/echo", key)
    with _connect(live_gateway + "/api/users/v1/bad-text", key) as ws:
        ws.send("hi")
        code, _, _ = _closed_with(ws)
    assert code == 1007
    deadline = time.monotonic() + 5
    while 1007 not in ws_upstream.closes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 1007 in ws_upstream.closes  # the upstream was told too


# -- refusals before any upgrade -----------------------------------------------------------------------------------


def test_bad_key_gets_401_before_any_upgrade(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    count = len(ws_upstream.handshakes)
    for bad in (None, "ak_live_" + "x" * 38):
        with pytest.raises(InvalidStatus) as caught:
            _connect(url, bad)
        assert caught.value.response.status_code == 401
        assert caught.value.response.headers["Content-Type"] == "application/problem+json"
    assert len(ws_upstream.handshakes) == count  # the upstream never heard of them


def test_connections_over_the_per_key_cap_get_429_across_workers(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url, websocket_max_connections=3)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    held = [_connect(url, key) for _ in range(3)]  # spread over both workers by fresh connections
    try:
        for _ in range(4):
            with pytest.raises(InvalidStatus) as caught:
                _connect(url, key)
            assert caught.value.response.status_code == 429
            assert b"3 open WebSocket connection" in caught.value.response.body
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the released lease frees a place at once
            try:
                held.append(_connect(url, key))
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "closing a connection did not free its place"
                time.sleep(0.05)
    finally:
        for ws in held:
            ws.close()


def test_a_browser_handshake_from_an_origin_the_cors_policy_does_not_allow_gets_403_before_any_upgrade(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    # Browsers apply no CORS to WebSocket (and send the user's cookies): the gateway refuses the origin itself.
    _, key = bob_key
    cors = services.policy_create(
        tenant=acme, name="web", policy_type="cors", config={"allow_origins": ["https://app.example.com"]}, actor=None
    )
    _ws_api(acme, bob_app, ws_upstream.url, policies=[cors])
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)  # no Origin (not a browser): let through
    count = len(ws_upstream.handshakes)
    for origin in ("https://evil.example", "https://app.example.com.evil.example", "null"):
        with pytest.raises(InvalidStatus) as caught:
            _connect(url, key, origin=origin)
        response = caught.value.response
        assert response.status_code == 403
        assert response.headers["Content-Type"] == "application/problem+json"
        assert b"origin-not-allowed" in response.body and b"may not open WebSocket connections" in response.body
    assert len(ws_upstream.handshakes) == count  # the upstream never heard of them
    with _connect(url, key, origin="https://app.example.com") as ws:
        ws.send("from the app")
        assert ws.recv(timeout=5) == "from the app"


def _refused_once_routed(url: str, key: str, timeout: float = 30) -> Any:
    """The answer to a handshake that is refused, once the workers have loaded the API (404 until then)."""
    deadline = time.monotonic() + timeout
    while True:
        with pytest.raises(InvalidStatus) as caught:
            _connect(url, key)
        response = caught.value.response
        if response.status_code != 404 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_a_handshake_over_the_rate_limit_gets_429_before_any_upgrade(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    limit = services.policy_create(
        tenant=acme, name="three", policy_type="rate_limiting", config={"requests_per_minute": 3}, actor=None
    )
    _ws_api(acme, bob_app, ws_upstream.url, policies=[limit])
    url = live_gateway + "/api/users/v1/echo"
    deadline = time.monotonic() + 30
    opened = 0
    while True:  # 404 until the workers load the API; then each handshake is one request against the limit
        try:
            with _connect(url, key) as ws:
                ws.send("counted")
                assert ws.recv(timeout=5) == "counted"
            opened += 1
        except InvalidStatus as refused:
            if refused.response.status_code != 404:
                response = refused.response
                break
        assert time.monotonic() < deadline and opened <= 6, "the handshakes were never limited"
        time.sleep(0.05)
    assert opened >= 1
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 1
    assert len(ws_upstream.handshakes) == opened  # the refused handshake never reached the upstream


def test_a_handshake_from_an_address_the_ip_rules_refuse_gets_403_before_any_upgrade(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    rules = services.policy_create(
        tenant=acme, name="no-loopback", policy_type="ip_rules", config={"deny": ["127.0.0.0/8"]}, actor=None
    )
    _ws_api(acme, bob_app, ws_upstream.url, policies=[rules])
    response = _refused_once_routed(live_gateway + "/api/users/v1/echo", key)
    assert response.status_code == 403
    assert response.headers["Content-Type"] == "application/problem+json"
    assert b"ip-refused" in response.body and b"127.0.0.1" in response.body
    assert ws_upstream.handshakes == []


def test_a_websocket_upstream_at_a_private_address_gets_502_and_is_never_contacted(
    live_env, tmp_path, acme, bob_app, bob_key
):
    _, key = bob_key
    with socket.socket() as listener:  # the "upstream": a loopback port that notes any connection
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        _ws_api(acme, bob_app, f"http://127.0.0.1:{listener.getsockname()[1]}")
        env = {
            **live_env,
            "UPSTREAM_ALLOW_PRIVATE": "0",
            "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p"),
        }
        with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as http_url:
            url = http_url.replace("http://", "ws://") + "/api/users/v1/echo"
            response = _refused_once_routed(url, key)
            for _ in range(4):  # both workers
                with pytest.raises(InvalidStatus) as caught:
                    _connect(url, key)
                assert caught.value.response.status_code == 502
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/problem+json"
    assert b"upstream-unavailable" in response.body


# -- controls ------------------------------------------------------------------------------------------------------


def test_message_over_the_size_cap_closes_with_1009(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url, websocket_max_message_bytes=1000)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    with _connect(url, key) as ws:
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "x" * 1000
        ws.send(["y" * 600, "y" * 600])  # over the cap only in its second fragment
        code, reason, _ = _closed_with(ws)
    assert code == 1009
    assert "1000 bytes" in reason


def test_idle_connection_is_closed_after_the_idle_timeout(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url, websocket_idle_timeout=1.5)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    with _connect(url, key) as ws:
        for _ in range(3):  # messages keep it open past the timeout
            time.sleep(0.8)
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
        last_message = time.monotonic()
        pongs = 0
        while True:  # pings (answered through the gateway) do not
            try:
                pongs += ws.ping(b"heartbeat").wait(0.5)
            except ConnectionClosed:
                break
            assert time.monotonic() - last_message < 6, "pings kept an idle connection open"
            time.sleep(0.2)
        waited = time.monotonic() - last_message
    assert (ws.close_code, ws.close_reason) == (1008, "Idle for more than 1.5 s.")
    assert pongs >= 3
    assert 1.3 < waited < 3.0


def _worker_pids(gateway_port: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"gunicorn" in cmdline and f"127.0.0.1:{gateway_port}".encode() in cmdline:
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if b"gunicorn" in (Path("/proc") / str(ppid) / "cmdline").read_bytes():
                pids.add(int(entry.name))
    return pids


def _serving_pid(ws: ClientConnection, pids: set[int]) -> int:
    """The gunicorn worker holding the server side of this client connection (from /proc)."""
    client_port = ws.local_address[1]
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == client_port and fields[3] == "01":
            inode = fields[9]
    assert inode, "server side of the connection not found"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def _on_both_workers(url: str, key: str) -> list[ClientConnection]:
    """Connections with ``key`` until each of the gateway's two workers holds at least one of them."""
    pids = _worker_pids(int(url.rsplit(":", 1)[1].split("/", 1)[0]))
    assert len(pids) == 2
    held: list[ClientConnection] = []
    seen: set[int] = set()
    while seen != pids:
        assert len(held) < 36, "connections never reached both workers"
        # Four handshakes at once: one after another, a busy machine lets one worker accept them all.
        with ThreadPoolExecutor(4) as pool:
            batch = list(pool.map(lambda _: _connect(url, key), range(4)))
        for ws in batch:
            held.append(ws)
            seen.add(_serving_pid(ws, pids))
    return held


def _closes_after(held: list[ClientConnection], act: Any) -> tuple[set[tuple[int, str]], float]:
    """Watch every connection, call ``act``; the (code, reason) pairs they were closed with and how long after
    ``act`` began the last one closed."""
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def watch(ws: ClientConnection) -> None:
        code, reason, _ = _closed_with(ws, timeout=10)
        with lock:
            results.append((code, reason, time.monotonic()))

    watchers = [threading.Thread(target=watch, args=(ws,)) for ws in held]
    for thread in watchers:
        thread.start()
    time.sleep(0.2)
    acted_at = time.monotonic()
    act()
    for thread in watchers:
        thread.join(15)
    assert len(results) == len(held)
    return {(code, reason) for code, reason, _ in results}, max(at for _, _, at in results) - acted_at


def test_revoking_the_key_closes_its_connections_on_both_workers_within_one_second(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    key_row, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url, websocket_max_connections=40)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    _, other_key = services.api_key_create(consumer=bob_app, actor=None)
    held = _on_both_workers(url, key)
    bystander = _connect(url, other_key)
    closes, slowest = _closes_after(
        held, lambda: services.api_key_revoke(key=ApiKey.objects.get(pk=key_row.pk), actor=None)
    )
    assert {code for code, _ in closes} == {1008}
    assert slowest < 1.0, f"the slowest connection closed {slowest:.2f} s after the revocation"
    bystander.send("still here")  # another key's connection is untouched
    assert bystander.recv(timeout=5) == "still here"
    bystander.close()


# -- secrets -------------------------------------------------------------------------------------------------------


def test_the_key_is_not_forwarded_by_any_of_its_three_routes(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    ws_upstream.handshakes.clear()
    with _connect(url, key) as ws:  # header
        ws.send("1")
        ws.recv(timeout=5)
    with connect(f"{url}?apikey={key}&x=1", proxy=None, open_timeout=10) as ws:  # query parameter
        ws.send("2")
        ws.recv(timeout=5)
    with connect(url, subprotocols=["chat", f"apikey.{key}"], proxy=None, open_timeout=10) as ws:  # protocol entry
        assert ws.subprotocol == "chat"
        ws.send("3")
        ws.recv(timeout=5)
    # A browser offering only the key (and the bare marker) gets the marker back, as browsers require.
    with connect(url, subprotocols=["apikey", f"apikey.{key}"], proxy=None, open_timeout=10) as ws:
        assert ws.subprotocol == "apikey"
        ws.send("4")
        ws.recv(timeout=5)
    assert len(ws_upstream.handshakes) == 4
    assert "sec-websocket-protocol" not in ws_upstream.handshakes[3][1]  # the marker is the gateway's own
    for path, headers, _ in ws_upstream.handshakes:
        assert key not in path
        assert all(key not in value for value in headers.values())
    assert ws_upstream.handshakes[1][0] == "/svc/echo?x=1"


def test_two_keys_in_one_handshake_get_401(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    with pytest.raises(InvalidStatus) as caught:
        connect(f"{url}?apikey={key}", additional_headers={"X-API-Key": key}, proxy=None, open_timeout=10)
    assert caught.value.response.status_code == 401


# -- shutdown ------------------------------------------------------------------------------------------------------


def test_graceful_worker_shutdown_closes_connections_with_1001(live_env, tmp_path, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    env = {**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p")}
    with gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as http_url:
        url = http_url.replace("http://", "ws://") + "/api/users/v1/echo"
        _wait_routable(url, key)
        ws = _connect(url, key)
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        port = int(http_url.rsplit(":", 1)[1])
        (worker,) = _worker_pids(port)
        os.kill(worker, signal.SIGTERM)
        code, reason, waited = _closed_with(ws, timeout=10)
    assert code == 1001
    assert "restarting" in reason
    assert waited < 3


def test_retiring_the_api_or_blocking_the_consumer_closes_connections_with_1008(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    api = _ws_api(acme, bob_app, ws_upstream.url, websocket_max_connections=40)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)

    held = _on_both_workers(url, key)
    closes, slowest = _closes_after(held, lambda: services.consumer_block(consumer=bob_app, actor=None))
    assert closes == {(1008, "The key no longer allows this API.")}
    assert slowest < 1.0, f"the slowest connection closed {slowest:.2f} s after the consumer was blocked"

    services.consumer_unblock(consumer=bob_app, actor=None)
    _wait_routable(url, key)
    held = _on_both_workers(url, key)
    closes, slowest = _closes_after(held, lambda: services.api_retire(api=api, actor=None))
    assert closes == {(1008, "The API was retired.")}
    assert slowest < 1.0, f"the slowest connection closed {slowest:.2f} s after the API was retired"


def test_a_connection_is_billed_as_one_request_with_its_message_bytes_each_way(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    api = _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    key_row, measured = services.api_key_create(consumer=bob_app, actor=None)  # a key of its own: exact counts
    with _connect(url, measured) as ws:
        for message in ("x" * 10, "é" * 10, b"\x00" * 100):  # 10 + 20 + 100 bytes each way
            ws.send(message)
            assert ws.recv(timeout=5) == message
    field = contract.Dimension(api.pk, bob_app.pk, key_row.pk, 101).field()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    deadline = time.monotonic() + 10
    while True:
        totals = [0] * len(contract.METRICS)
        for name in client.scan_iter(match=contract.minute_key(acme.id, 0).replace(":m:0", ":m:*")):
            value = client.hget(name, field)
            if value is not None:
                contract.merge(totals, contract.decode(value.decode()))
        if totals[:4] == [1, 0, 130, 130] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert totals[:4] == [1, 0, 130, 130]  # one request (the handshake), no error, the bytes each way


def test_a_worker_retiring_after_max_requests_closes_its_connections_with_1001(
    live_env, tmp_path, acme, bob_app, bob_key, ws_upstream
):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    env = {
        **live_env,
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p"),
        "GUNICORN_MAX_REQUESTS": "40",
        "GUNICORN_MAX_REQUESTS_JITTER": "0",
    }
    with gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as http_url:
        url = http_url.replace("http://", "ws://") + "/api/users/v1/echo"
        _wait_routable(url, key)
        ws = _connect(url, key)
        for _ in range(45):  # plain requests until the worker has served its 40
            requests.get(http_url + "/api/users/v1/echo", headers={"X-API-Key": key}, timeout=10)
        code, reason, _ = _closed_with(ws, timeout=10)
    assert code == 1001
    assert "restarting" in reason


def test_connection_leases_are_counted_in_redis_and_a_dead_workers_expire(monkeypatch, acme, bob_app, bob_key):
    """The cap's bookkeeping on the real Redis: a worker that dies never releases, its leases lapse."""
    from types import SimpleNamespace

    from gateway import websocket

    route = SimpleNamespace(tenant_id=acme.id, api_id="api_leases")
    record = SimpleNamespace(key_id=bob_key[0].pk)
    monkeypatch.setattr(websocket, "LEASE_SECONDS", 1.0)
    dead_worker, live_worker = websocket.Leases(), websocket.Leases()
    held = [dead_worker.acquire(route, record, 2), dead_worker.acquire(route, record, 2)]
    assert all(lease is not None for lease in held)
    assert live_worker.acquire(route, record, 2) is None
    name = websocket.lease_set_name(acme.id, "api_leases", bob_key[0].pk)
    assert name.startswith(f"websocket:{{{acme.id}}}:")  # the tenant's hash tag: one cluster slot per tenant
    time.sleep(1.2)  # the dead worker renews nothing
    lease = live_worker.acquire(route, record, 2)
    assert lease is not None
    live_worker.renew()
    time.sleep(0.6)
    live_worker.renew()
    time.sleep(0.6)  # 1.2 s after acquiring, kept by its renewals
    assert live_worker.acquire(route, record, 2) is not None
    assert live_worker.acquire(route, record, 2) is None
    live_worker.release(lease)
    assert live_worker.acquire(route, record, 2) is not None


@pytest.mark.parametrize("certificate_name", ["localhost", "other.example"])
def test_a_wss_upstream_is_reached_with_its_certificate_checked_for_its_name(
    live_env, tmp_path, acme, bob_app, bob_key, certificate_name
):
    _, key = bob_key
    cert, private_key = self_signed_certificate(tmp_path, certificate_name)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, private_key)
    upstream = WsUpstream(tls)
    try:
        _ws_api(acme, bob_app, upstream.url)  # https://localhost:<port>: wss to it
        env = {
            **live_env,
            "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p"),
            "SSL_CERT_FILE": str(cert),  # the gateway trusts this certificate as its own CA
        }
        with gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as http_url:
            url = http_url.replace("http://", "ws://") + "/api/users/v1/echo"
            if certificate_name == "localhost":
                _wait_routable(url, key)
                with _connect(url, key) as ws:
                    ws.send("over tls")
                    assert ws.recv(timeout=5) == "over tls"
            else:
                started = time.monotonic()
                while True:
                    with pytest.raises(InvalidStatus) as caught:
                        _connect(url, key)
                    if caught.value.response.status_code != 404 or time.monotonic() - started > 30:
                        break
                    time.sleep(0.2)  # the worker has not loaded the API yet
                assert caught.value.response.status_code == 502
                assert upstream.handshakes == []  # no WebSocket handshake reached a server with the wrong name
    finally:
        upstream.stop()


_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def test_an_api_without_websocket_proxies_an_upgrade_request_as_plain_http(gateway, users_api, upstream, key):
    response = gateway.get("/api/users/v1/echo", headers={**_HANDSHAKE, "X-API-Key": key})
    assert response.status == 200
    seen = upstream.seen[-1].headers
    assert "upgrade" not in seen and "sec-websocket-key" in seen  # hop-by-hop dropped, as before


def test_a_server_that_cannot_hand_the_connection_over_answers_501_before_contacting_the_upstream(
    gateway, acme, bob_app, key, upstream
):
    _ws_api(acme, bob_app, upstream.url)
    response = gateway.get("/api/users/v1/echo", headers={**_HANDSHAKE, "X-API-Key": key})
    assert response.status == 501
    assert response.json()["type"].endswith("websocket-unsupported")
    assert upstream.seen == []


def test_an_invalid_handshake_gets_400_or_426_naming_what_is_wrong(live_gateway, acme, bob_app, bob_key, ws_upstream):
    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    host, port = url.removeprefix("ws://").split("/", 1)[0].split(":")
    count = len(ws_upstream.handshakes)

    def answer(headers: dict[str, str]) -> tuple[int, bytes]:
        lines = "".join(f"{name}: {value}\r\n" for name, value in {**_HANDSHAKE, **headers}.items() if value)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET /api/users/v1/echo HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n{lines}\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1]), data

    status, data = answer({"Sec-WebSocket-Version": "8"})
    assert status == 426 and b"Sec-WebSocket-Version: 13" in data
    status, data = answer({"Sec-WebSocket-Key": ""})
    assert status == 400 and b"Sec-WebSocket-Key" in data
    assert len(ws_upstream.handshakes) == count


def test_a_key_that_expires_while_connected_is_closed_when_it_expires(
    live_gateway, acme, bob_app, bob_key, ws_upstream
):
    from datetime import timedelta

    from django.utils import timezone

    _, key = bob_key
    _ws_api(acme, bob_app, ws_upstream.url)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    expires = timezone.now() + timedelta(seconds=3)
    _, short_lived = services.api_key_create(consumer=bob_app, actor=None, expires_at=expires)
    with _connect(url, short_lived) as ws:
        ws.send("still valid")
        assert ws.recv(timeout=5) == "still valid"
        code, reason, _ = _closed_with(ws, timeout=10)
        closed_at = timezone.now()
    assert (code, reason) == (1008, "The key expired.")
    assert timedelta(0) <= closed_at - expires < timedelta(seconds=1)
