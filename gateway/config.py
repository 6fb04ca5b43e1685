"""The worker's route table, the configuration version it follows and the key evictions it applies.

A background thread polls Redis (see apimgmt.invalidation for the contract): a moved version reloads the route
table; eviction messages drop the named keys from the worker's key cache and nothing else.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, connection

from apimgmt import invalidation, selectors
from gateway import metrics
from gateway.routing import RouteTable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Reload even without a version change this often: a missed bump (Redis was down) heals itself.
SAFETY_RELOAD_SECONDS = 30.0


def db_call(fn: Callable[..., T], *args: Any) -> T:
    """Run a selector and give the connection back afterwards (gateway requests skip Django's request signals)."""
    try:
        return fn(*args)
    finally:
        if not connection.in_atomic_block:
            connection.close()


class RouteState:
    """The route table of this worker and the config version it was built for."""

    def __init__(self, poll_seconds: float | None = None) -> None:
        self.poll_seconds = float(poll_seconds if poll_seconds is not None else settings.GATEWAY["CONFIG_POLL_SECONDS"])
        self.table: RouteTable | None = None
        self.version = -2
        self.seen_version: int | None = None
        self.loaded_at = 0.0
        self.lock = threading.Lock()
        self.on_change: list[Callable[[], None]] = []
        # Called with key hashes to drop from the key caches; on_keys_lost when evictions may have been missed.
        self.on_evict: list[Callable[[list[str]], None]] = []
        self.on_keys_lost: list[Callable[[], None]] = []
        self.eviction_cursor: str | None = None
        # Counters for operators and tests: route-table builds, key hashes evicted, times every key was dropped.
        self.reloads = 0
        self.evicted = 0
        self.keys_lost = 0
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.stopped = threading.Event()

    @property
    def loaded(self) -> bool:
        return self.table is not None

    def current(self) -> RouteTable:
        """The table to route with; reloaded here (on a request thread) when the version moved."""
        table = self.table
        if (
            table is None
            or (self.seen_version is not None and self.seen_version != self.version)
            or time.monotonic() - self.loaded_at > SAFETY_RELOAD_SECONDS
        ):
            table = self.reload()
        return table

    def reload(self) -> RouteTable:
        with self.lock:
            wanted = self.seen_version
            if (
                self.table is not None
                and wanted == self.version
                and time.monotonic() - self.loaded_at <= SAFETY_RELOAD_SECONDS
            ):
                return self.table  # another thread reloaded while we waited
            if wanted is None:
                wanted = self._read_version()
            try:
                table = RouteTable(db_call(selectors.route_snapshot))
            except DatabaseError:
                if self.table is None:
                    raise
                logger.exception("route table reload failed; keeping the previous table")
                self.loaded_at = time.monotonic()
                return self.table
            changed = wanted != self.version
            # The counter went back: Redis lost its data, and with it any evictions not yet read.
            went_back = 0 <= wanted < self.version
            self.table, self.version, self.loaded_at = table, wanted, time.monotonic()
            self.reloads += 1
        metrics.route_table_loads_total.inc()
        if went_back:
            self._drop_all_keys()
        if changed:
            for callback in self.on_change:
                callback()
            logger.info("route table loaded", extra={"config_version": wanted, "routes": len(table.routes)})
        return table

    def _read_version(self) -> int:
        try:
            return invalidation.read_config_version()
        except Exception:
            return self.version

    # -- background poller --------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive() and self.pid == os.getpid():
            return
        self.pid = os.getpid()
        try:
            self.eviction_cursor = invalidation.eviction_cursor()
        except Exception:  # Redis unavailable: the first successful poll starts from its end
            self.eviction_cursor = None
        self.stopped.clear()
        self.thread = threading.Thread(target=self._poll, name="config-poller", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _poll(self) -> None:
        while not self.stopped.wait(self.poll_seconds):
            try:
                self.seen_version = invalidation.read_config_version()
                self.apply_evictions()
            except Exception:  # noqa: S112 - Redis unavailable: keep the table; the safety reload still runs
                continue

    def apply_evictions(self) -> None:
        """Read the eviction stream from this worker's cursor and drop what it names (all keys after a gap)."""
        if self.eviction_cursor is None:
            # Redis was unreachable when this worker started: evictions of that time are unknown.
            self.eviction_cursor = invalidation.eviction_cursor()
            self._drop_all_keys()
            return
        while True:
            batch = invalidation.read_evictions(self.eviction_cursor)
            self.eviction_cursor = batch.cursor
            if not batch.complete:
                logger.warning("key evictions were missed (trimmed or Redis lost its data); dropping every cached key")
                self._drop_all_keys()
            if batch.key_hashes:
                self.evicted += len(batch.key_hashes)
                metrics.key_cache_evictions_total.inc(len(batch.key_hashes))
                for evict in self.on_evict:
                    evict(batch.key_hashes)
            if not batch.more:
                return

    def _drop_all_keys(self) -> None:
        self.keys_lost += 1
        metrics.key_cache_lost_total.inc()
        for callback in self.on_keys_lost:
            callback()
