"""Liveness (/health) and readiness (/ready) probes: cheap, unauthenticated, quiet on success."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

from apimgmt.redis_client import get_redis

# Extra readiness conditions registered by other apps (the gateway adds "route table loaded").
READINESS_CHECKS: dict[str, Callable[[], bool]] = {}


@never_cache
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


# Readiness must flip within ~2 s of a dependency stopping, so its checks wait at most this long.
PROBE_TIMEOUT_SECONDS = 1

# Connection parameters Django adds for its own cursors; libpq does not know them.
_NOT_LIBPQ = ("cursor_factory", "context", "prepare_threshold", "pool")


def _database_ok() -> bool:
    if connection.vendor != "postgresql":
        return _django_connection_ok()
    # A short-lived connection of its own: the pooled one would wait up to the pool timeout (10 s) for
    # a connection when PostgreSQL is down, and a stale persistent one can hang on a stopped server.
    params = {k: v for k, v in connection.get_connection_params().items() if k not in _NOT_LIBPQ}
    params["connect_timeout"] = min(int(params.get("connect_timeout") or PROBE_TIMEOUT_SECONDS), PROBE_TIMEOUT_SECONDS)
    params["options"] = f"{params.get('options', '')} -c statement_timeout={PROBE_TIMEOUT_SECONDS * 1000}".strip()
    try:
        with psycopg.connect(**params, autocommit=True) as probe:
            probe.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _django_connection_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        connection.close_if_unusable_or_obsolete()
        return False


def _redis_ok() -> bool:
    client = get_redis()
    if client is None:
        return True
    if isinstance(client, redis.RedisCluster):
        # One answering primary is enough: while a failed master's replica takes over, the tenants on every other
        # slot are still served, and a fleet that all turned unready at once would serve none of them.
        for node in client.get_primaries():
            try:
                if client.ping(target_nodes=node):
                    return True
            except redis.RedisError:
                continue
        return False
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@never_cache
def ready(request: HttpRequest) -> JsonResponse:
    started = time.perf_counter()
    checks = {"database": _database_ok(), "redis": _redis_ok() if settings.REDIS_URL else True}
    for name, check in READINESS_CHECKS.items():
        try:
            checks[name] = bool(check())
        except Exception:
            checks[name] = False
    failed = sorted(name for name, ok in checks.items() if not ok)
    body = {
        "status": "ok" if not failed else "unavailable",
        "checks": {name: "ok" if ok else "failed" for name, ok in checks.items()},
        "failed": failed,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    return JsonResponse(body, status=200 if not failed else 503)
