"""The one Redis client of a process (short timeouts), shared by the gateway, invalidation and probes."""

from __future__ import annotations

import threading

import redis
from django.conf import settings

_lock = threading.Lock()
_client: redis.Redis | None = None
_client_url: str | None = None


def get_redis() -> redis.Redis | None:
    """The process-wide client for REDIS_URL, or None when Redis is not configured."""
    global _client, _client_url
    url = settings.REDIS_URL
    if not url:
        return None
    if _client is None or _client_url != url:
        with _lock:
            if _client is None or _client_url != url:
                _client = redis.Redis.from_url(
                    url,
                    socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
                    socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
                    health_check_interval=0,
                    retry_on_timeout=False,
                    max_connections=256,
                )
                _client_url = url
    return _client


def reset_redis() -> None:
    """Forget the client (after a fork, or when tests point REDIS_URL elsewhere)."""
    global _client, _client_url
    with _lock:
        if _client is not None:
            _client.close()
        _client = None
        _client_url = None
