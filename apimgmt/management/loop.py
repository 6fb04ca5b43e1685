"""What the long-running commands (``flush_usage --follow``, ``deliver_events --follow``) share: their own
Prometheus registry served on a port, a stop on SIGTERM/SIGINT, and rounds retried with backoff after a Redis or
database error."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Self

import redis
from django.db import DatabaseError, connections
from redis.exceptions import RedisClusterException

# What a round may fail with and be retried after: Redis (RedisClusterException is not a RedisError: redis-py raises
# it when no cluster node answers, the slot map cannot be read, or a call spans slots) and the database.
RETRIED_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException, DatabaseError)


class CommandMetrics:
    """A command's own /metrics (it serves no HTTP otherwise), in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    def serve(self, port: int) -> Self:
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)
        return self


class StopSignal:
    """Set by SIGTERM or SIGINT once installed; ``sleep`` wakes early when it is set."""

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> StopSignal:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.05)


def follow(round_: Callable[[], float], *, logger: logging.Logger, failure: str, using: str = "default") -> None:
    """Run ``round_`` until SIGTERM/SIGINT, pausing for the seconds it returns. A Redis, Redis Cluster or database
    error (RETRIED_ERRORS) is logged as ``"<failure>, retrying in …"`` and the round retried after a backoff (0.2 s
    doubling up to 5 s); after a database error the connection ``using`` is closed so the next round opens a fresh
    one."""
    stop = StopSignal().install()
    backoff = 0.0
    while not stop.stopping:
        try:
            pause = round_()
            backoff = 0.0
            stop.sleep(pause)
        except RETRIED_ERRORS as exc:
            backoff = min(max(backoff * 2, 0.2), 5.0)
            logger.warning("%s, retrying in %.1fs: %s: %s", failure, backoff, exc.__class__.__name__, exc)
            if isinstance(exc, DatabaseError):
                connections[using].close()
            stop.sleep(backoff)
