"""/ready turns 503 within 2 s of Redis or PostgreSQL stopping and 200 again after; /health stays 200."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from django.conf import settings
from django.test import Client

from apimgmt.redis_client import reset_redis
from tests.support.faults import postgres_cluster, redis_server
from tests.support.servers import gunicorn


def _seconds_until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def ready_with_private_redis(db: Any, settings: Any) -> Any:
    with redis_server() as server:
        settings.REDIS_URL = server.url
        reset_redis()
        try:
            yield server
        finally:
            reset_redis()


def test_ready_fails_within_two_seconds_of_redis_stopping_and_recovers(
    ready_with_private_redis: Any, client: Client
) -> None:
    server = ready_with_private_redis
    assert client.get("/ready").status_code == 200

    server.stop()
    assert _seconds_until(lambda: client.get("/ready").status_code == 503) < 2.0
    body = client.get("/ready").json()
    assert body["failed"] == ["redis"] and body["checks"]["database"] == "ok"
    assert client.get("/health").status_code == 200, "liveness does not depend on Redis"

    server.start()
    assert _seconds_until(lambda: client.get("/ready").status_code == 200) < 5.0


def test_ready_fails_within_two_seconds_while_redis_hangs(ready_with_private_redis: Any, client: Client) -> None:
    server = ready_with_private_redis
    assert client.get("/ready").status_code == 200
    server.pause()  # SIGSTOP: connections are accepted by the kernel but never answered
    try:
        started = time.monotonic()
        response = client.get("/ready")
        assert time.monotonic() - started < 2.0
        assert response.status_code == 503 and "redis" in response.json()["failed"]
    finally:
        server.resume()
    assert _seconds_until(lambda: client.get("/ready").status_code == 200) < 5.0


def test_ready_fails_within_two_seconds_of_postgresql_stopping_and_recovers(live_env: dict[str, str]) -> None:
    # Our own throwaway cluster (initdb + pg_ctl on a free port), never the shared server; the app runs
    # under gunicorn with the production connection pool, whose 10 s pool timeout the probe must not wait for.
    with postgres_cluster() as cluster:
        env = {**live_env, "DATABASE_URL": cluster.url, "DB_POOL": "1", "APIMGMT_ROLE": "control"}
        with gunicorn(env, workers=1) as base:
            assert requests.get(f"{base}/ready", timeout=5).status_code == 200

            cluster.stop()
            elapsed = _seconds_until(lambda: requests.get(f"{base}/ready", timeout=5).status_code == 503)
            assert elapsed < 2.0
            response = requests.get(f"{base}/ready", timeout=5)
            assert response.json()["failed"] == ["database"]
            assert response.headers["Content-Type"] == "application/json"
            assert requests.get(f"{base}/health", timeout=5).status_code == 200

            cluster.start()
            assert _seconds_until(lambda: requests.get(f"{base}/ready", timeout=5).status_code == 200) < 5.0


def test_probes_need_no_authentication_and_are_never_cached(db: Any, client: Client) -> None:
    for path in ("/health", "/ready"):
        response = client.get(path)
        assert response.status_code == 200
        assert "no-cache" in response["Cache-Control"]
    assert settings.APIMGMT_ROLE == "all"
