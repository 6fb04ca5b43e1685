"""Slow request bodies: a client dribbling its body gets 408, never holds an upstream, never trips the breaker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from apimgmt import services
from apimgmt.models import Api
from tests.gateway.conftest import InProcessGateway, Response, publish, subscribe
from tests.gateway.upstreams import Received, answering, raw_upstream
from tests.support.servers import gunicorn


@contextmanager
def client_connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real TCP connection on loopback: (the client's end, the gateway's end)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


class Dribbler:
    """Sends ``data`` at once, then one byte of ``trickle`` every ``interval`` seconds, in a thread."""

    def __init__(self, sock: socket.socket, data: bytes, trickle: bytes, interval: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sock, data, trickle, interval), daemon=True)

    def _run(self, sock: socket.socket, data: bytes, trickle: bytes, interval: float) -> None:
        try:
            if data:
                sock.sendall(data)
            for byte in trickle:
                if self.stop.wait(interval):
                    return
                sock.send(bytes([byte]))
        except OSError:
            return

    def __enter__(self) -> Dribbler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def post_from(gateway: InProcessGateway, server: socket.socket, length: int, key: str) -> Response:
    """POST whose body the gateway reads from ``server`` (as under gunicorn: its socket's file and the socket)."""
    return gateway.request(
        "POST",
        "/api/users/v1/upload",
        headers={"X-API-Key": key},
        environ_extra={
            "wsgi.input": server.makefile("rb"),
            "gunicorn.socket": server,
            "CONTENT_LENGTH": str(length),
        },
    )


def breaker_failures(api: Api) -> tuple[str, int]:
    from gateway.wsgi import get_gateway

    entry = get_gateway().breakers.get(api.id)
    return ("closed", 0) if entry is None else (entry[1].state, entry[1].failures)


def _api(acme, bob_app, url: str, **options: Any) -> Api:
    options.setdefault("cb_failure_threshold", 1)  # one counted failure would open the circuit
    options.setdefault("cb_recovery_timeout", 60)
    api = publish(acme, url, retries=0, **options)
    subscribe(bob_app, api)
    return api


def test_a_small_body_sent_a_byte_at_a_time_gets_408_and_never_reaches_the_upstream(
    settings_gateway, acme, bob_app, key
):
    settings_gateway(BODY_READ_TIMEOUT=0.5)
    gateway = InProcessGateway()
    received = Received()
    with raw_upstream(answering(received)) as url, client_connection() as (client, server):
        api = _api(acme, bob_app, url)
        with Dribbler(client, b"", b"x" * 1000, interval=0.2):
            started = time.monotonic()
            response = post_from(gateway, server, 1000, key)
            elapsed = time.monotonic() - started
        assert response.status == 408
        assert response.header("Content-Type") == "application/problem+json"
        assert response.json()["type"].endswith("body-timeout")
        assert "within 0.5 s" in response.json()["detail"]
        assert 0.5 <= elapsed < 3  # the dribble alone would take 200 s
        assert received.connections == 0  # read whole before the upstream is contacted: it never was
        assert breaker_failures(api) == ("closed", 0)
        assert gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}").status == 200


def test_a_large_body_that_stalls_gets_408_and_is_not_held_against_the_upstream(settings_gateway, acme, bob_app, key):
    settings_gateway(BODY_READ_TIMEOUT=0.5)
    gateway = InProcessGateway()
    received = Received()
    with raw_upstream(answering(received)) as url, client_connection() as (client, server):
        api = _api(acme, bob_app, url)
        # Over the buffering size: streamed to the upstream as it comes, until it stops coming.
        with Dribbler(client, b"y" * 70_000, b"y" * 1000, interval=0.2):
            response = post_from(gateway, server, 200_000, key)
        assert response.status == 408
        assert received.bodies == []  # the upstream never got a complete request
        assert received.connections == 1
        assert breaker_failures(api) == ("closed", 0)
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200


@pytest.mark.parametrize("buffered", [True, False])
def test_a_body_that_ends_before_its_length_gets_400_naming_the_shortfall(
    settings_gateway, acme, bob_app, key, buffered
):
    settings_gateway(BUFFER_BODY_BYTES=64 * 1024 if buffered else 0)
    gateway = InProcessGateway()
    received = Received()
    with raw_upstream(answering(received)) as url, client_connection() as (client, server):
        api = _api(acme, bob_app, url)
        client.sendall(b"z" * 10)
        client.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        response = post_from(gateway, server, 1000, key)
    assert response.status == 400
    assert response.json()["detail"] == "The request body ended after 10 of its 1000 bytes."
    assert received.bodies == []
    assert breaker_failures(api) == ("closed", 0)


def test_waiting_for_a_slow_but_steady_client_does_not_use_up_the_upstreams_total_timeout(
    settings_gateway, acme, bob_app, key
):
    # The API's total timeout (0.5 s) is for the upstream; the 0.8 s the client takes for its body is not.
    settings_gateway(BODY_READ_TIMEOUT=3, BUFFER_BODY_BYTES=0)
    gateway = InProcessGateway()
    received = Received()
    with raw_upstream(answering(received)) as url, client_connection() as (client, server):
        _api(acme, bob_app, url, connect_timeout=0.5, total_timeout=0.5)
        client.sendall(b"12345")
        timer = threading.Timer(0.8, client.sendall, args=(b"67890",))
        timer.start()
        try:
            response = post_from(gateway, server, 10, key)
        finally:
            timer.join()
    assert (response.status, response.body) == (200, b"ok")
    assert received.bodies == [b"1234567890"]


def _slow_client(base: str, key: str, length: int, prefix: bytes, results: list[bytes]) -> None:
    """POST with Content-Length ``length``: ``prefix`` at once, then a byte every 0.5 s; records the status line."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /api/users/v1/upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: {key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
            + prefix
        )
        sender = Dribbler(sock, b"", b"s" * (length - len(prefix)), interval=0.5)
        with sender:
            sock.settimeout(8)
            try:
                answer = sock.recv(65536)
            except OSError:
                answer = b""
        results.append(answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else answer)


@pytest.mark.timeout(90)
def test_sixteen_slow_body_clients_under_gunicorn_get_408_while_others_are_served_and_the_breaker_stays_closed(
    live_env, acme, bob_app, bob_key, tmp_path
):
    _, key = bob_key
    env = {
        **live_env,
        "GATEWAY_BODY_READ_TIMEOUT": "3",
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    received = Received()
    with (
        raw_upstream(answering(received)) as upstream,
        gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as base,
    ):
        # A breaker that three counted failures open (on each worker), and a total timeout shorter than the stalls.
        api = _api(acme, bob_app, upstream, cb_failure_threshold=3, connect_timeout=1, total_timeout=1)
        # bob's key sends the slow bodies; another consumer's requests must not suffer for it.
        other = services.consumer_create(tenant=acme, name="other-app", actor=None)
        subscribe(other, api)
        _, other_key = services.api_key_create(consumer=other, name="default", actor=None)
        url = base + "/api/users/v1/x"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url, headers={"X-API-Key": other_key}, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # a cold worker on a loaded machine: ask again
            assert time.monotonic() < deadline, "the gateway did not start serving the API"
            time.sleep(0.1)

        results: list[bytes] = []
        # Half with small bodies (read whole first), half with bodies streamed to the upstream as they come.
        shapes = [(1000, b"")] * 8 + [(200_000, b"p" * 70_000)] * 8
        clients = [
            threading.Thread(target=_slow_client, args=(base, key, length, prefix, results))
            for length, prefix in shapes
        ]
        for thread in clients:
            thread.start()
        time.sleep(0.5)  # all 16 are now dribbling
        started = time.monotonic()
        during = requests.get(url, headers={"X-API-Key": other_key}, timeout=5)
        assert during.status_code == 200
        assert time.monotonic() - started < 2.0  # served meanwhile, not after the slow clients (cut at 3 s)
        for thread in clients:
            thread.join(20)

        assert results == [b"408"] * 16
        # Neither worker counted a failure: fresh connections (spread over both workers) all get through.
        statuses = [requests.get(url, headers={"X-API-Key": other_key}, timeout=5).status_code for _ in range(12)]
        assert statuses == [200] * 12
        posted = requests.post(base + "/api/users/v1/y", headers={"X-API-Key": other_key}, data=b"{}", timeout=5)
        assert (posted.status_code, posted.content) == (200, b"ok")
        assert not any(len(body) == 200_000 for body in received.bodies)


@pytest.mark.parametrize(("name", "value"), [("GATEWAY_BODY_READ_TIMEOUT", "-1"), ("GATEWAY_BUFFER_BODY_BYTES", "-5")])
def test_negative_body_settings_stop_start_up_with_a_clear_message(name: str, value: str) -> None:
    from tests.support.settings_probe import run_python

    result = run_python("import django; django.setup()", {"DEBUG": "1", name: value})
    assert result.returncode != 0
    assert "GATEWAY_BODY_READ_TIMEOUT and GATEWAY_BUFFER_BODY_BYTES must be 0 (off) or more" in result.stderr
