"""Logs database queries slower than settings.SLOW_QUERY_MS with the words "slow query" (operators grep for them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

logger = logging.getLogger("apimgmt.db")

# Long statements (bulk upserts) are cut: the log line should point at the query, not carry it.
_MAX_SQL_CHARS = 500


class SlowQueryLogger:
    """A connection.execute_wrapper: times each statement; parameters are never logged (they may be secrets)."""

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            if elapsed_ms >= settings.SLOW_QUERY_MS:
                connection = context.get("connection")
                logger.warning(
                    "slow query: %.1f ms",
                    elapsed_ms,
                    extra={
                        "duration_ms": round(elapsed_ms, 1),
                        "sql": str(sql)[:_MAX_SQL_CHARS],
                        "database": getattr(connection, "alias", ""),
                        "threshold_ms": settings.SLOW_QUERY_MS,
                    },
                )


_WRAPPER = SlowQueryLogger()


def _attach(connection: BaseDatabaseWrapper) -> None:
    if _WRAPPER not in connection.execute_wrappers:
        connection.execute_wrappers.append(_WRAPPER)


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    _attach(connection)


def install_slow_query_logging() -> None:
    """Time every query of every connection of this process (idempotent; called from AppConfig.ready)."""
    connection_created.connect(_on_connection_created, dispatch_uid="apimgmt.slow_queries")
    for connection in connections.all(initialized_only=True):
        _attach(connection)
