"""The Django cache (portal lock-outs, mail throttle) waits for Redis no longer than REDIS_SOCKET_TIMEOUT."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.settings_probe import run_python

PROBE = """
import json, time
import django
django.setup()
from django.conf import settings
from django.core.cache import cache
started = time.monotonic()
try:
    cache.get("portal:lockout:probe")
    outcome = "answered"
except Exception as exc:
    outcome = type(exc).__name__
print(json.dumps({"options": settings.CACHES["default"]["OPTIONS"], "outcome": outcome,
                  "elapsed": time.monotonic() - started}))
"""


@pytest.fixture
def stalled_redis() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: Redis hung, not down."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.mark.parametrize("timeout", [0.2, 0.6])
def test_a_hung_redis_holds_a_cache_read_for_redis_socket_timeout_only(stalled_redis: int, timeout: float) -> None:
    env = {"DEBUG": "1", "REDIS_URL": f"redis://127.0.0.1:{stalled_redis}/0", "REDIS_SOCKET_TIMEOUT": str(timeout)}
    result = run_python(PROBE, env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["options"]["SOCKET_TIMEOUT"] == timeout
    assert report["outcome"] == "TimeoutError"
    # Room for a loaded machine above, none below: the read gave up after the configured time, not a fixed 1 s.
    assert timeout <= report["elapsed"] < timeout + 0.35


def test_the_default_is_the_documented_quarter_second(stalled_redis: int) -> None:
    result = run_python(
        PROBE, {"DEBUG": "1", "REDIS_URL": f"redis://127.0.0.1:{stalled_redis}/0"}, drop={"REDIS_SOCKET_TIMEOUT"}
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["options"]["SOCKET_TIMEOUT"] == 0.25
    assert 0.25 <= report["elapsed"] < 0.6
