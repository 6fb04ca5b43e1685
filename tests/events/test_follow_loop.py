"""The long-running commands' loop (apimgmt/management/loop.py): a round that fails with a Redis Cluster error is
logged and retried like any Redis error; the process does not exit."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import redis
from redis.exceptions import RedisClusterException

from apimgmt.management import loop


@pytest.mark.parametrize(
    "error",
    [
        RedisClusterException("MGET - all keys must map to the same key slot"),
        redis.ConnectionError("Connection refused"),
    ],
    ids=["cluster", "connection"],
)
def test_a_failing_round_is_logged_and_retried(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def round_() -> float:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        os.kill(os.getpid(), signal.SIGTERM)  # the stop a pod gets: the loop ends after this round
        return 0.0

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with caplog.at_level(logging.WARNING):
            loop.follow(round_, logger=logging.getLogger("test.loop"), failure="round failed")
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert calls == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "test.loop"]
    assert warning.startswith("round failed, retrying in 0.2s: ") and type(error).__name__ in warning
