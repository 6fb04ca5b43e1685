"""WebSocket in Prometheus, scraped from the metrics port of gunicorn with two workers: the open-connections gauge
rises while connections are open and falls back when they close, messages are counted in each direction, and the
time connections were open is added when they end. A `websockets` client and a real `websockets` upstream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from apimgmt.models import Api, ApiKey, Consumer, Tenant
from tests.gateway.conftest import publish, subscribe
from tests.gateway.test_websocket import WsUpstream, _connect, _wait_routable
from tests.support.servers import free_port, gunicorn

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    upstream = WsUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def ws_api(acme: Tenant, bob_app: Consumer, ws_upstream: WsUpstream, settings: object) -> Api:
    settings.UPSTREAM_ALLOW_PRIVATE = True  # type: ignore[attr-defined]
    api = publish(acme, ws_upstream.url + "/svc", websocket=True)
    subscribe(bob_app, api)
    return api


@pytest.fixture
def metered(live_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(the gateway's ws:// base, its metrics URL): two workers, metrics on a port of their own."""
    port = free_port()
    env = {
        **live_env,
        "METRICS_PORT": str(port),
        "METRICS_ADDRESS": "127.0.0.1",
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as url:
        yield url.replace("http://", "ws://"), f"http://127.0.0.1:{port}/metrics"


def _sample(metrics_url: str, name: str, **labels: str) -> float:
    text = requests.get(metrics_url, timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _until(read: Callable[[], float], expected: float, timeout: float = 10, *, at_least: bool = False) -> float:
    """``read()`` once it gives ``expected`` (or more, ``at_least``), else its last value after ``timeout``: the
    workers add their counts every second."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected or (at_least and value > expected) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_open_connections_messages_each_way_and_connection_seconds(
    metered: tuple[str, str], ws_api: Api, bob_key: tuple[ApiKey, str]
) -> None:
    base, metrics_url = metered
    _, key = bob_key
    url = base + "/api/users/v1/echo"
    _wait_routable(url, key)

    def gauge() -> float:
        return _sample(metrics_url, "api_websocket_connections", api=ws_api.id)

    def messages(direction: str) -> float:
        return _sample(metrics_url, "api_websocket_messages_total", api=ws_api.id, direction=direction)

    def seconds() -> float:
        return _sample(metrics_url, "api_websocket_connection_seconds_total", api=ws_api.id)

    assert _until(gauge, 0) == 0  # the readiness handshakes have ended
    before_in, before_out, before_seconds = messages("in"), messages("out"), seconds()

    opened_at = time.monotonic()
    held = [_connect(url, key) for _ in range(3)]  # fresh connections: both workers may hold some
    try:
        assert _until(gauge, 3) == 3
        for index, ws in enumerate(held):
            for n in range(index + 1):  # 1 + 2 + 3 messages each way
                ws.send(f"message {n}")
                assert ws.recv(timeout=5) == f"message {n}"
        # Counted while the connections are still open (each worker adds its counts every second).
        assert _until(lambda: messages("in") - before_in, 6) == 6
        assert _until(lambda: messages("out") - before_out, 6) == 6
        time.sleep(1.0)
    finally:
        for ws in held:
            ws.close()
    held_for = time.monotonic() - opened_at

    assert _until(gauge, 0) == 0
    added = _until(lambda: seconds() - before_seconds, 3.0, at_least=True)  # added when each connection ends
    assert 3 * 1.0 <= added <= 3 * held_for + 0.5
    assert messages("in") - before_in == 6 and messages("out") - before_out == 6  # nothing counted twice

    text = requests.get(metrics_url, timeout=10).text
    directions = {
        sample.labels.get("direction")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "api_websocket_messages_total"
    }
    assert directions == {"in", "out"}  # bounded labels: the API and a fixed direction
