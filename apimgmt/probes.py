"""Liveness (/health) and readiness (/ready) probes: cheap, unauthenticated, quiet on success."""

from __future__ import annotations

import time
from collections.abc import Callable

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


def _database_ok() -> bool:
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
