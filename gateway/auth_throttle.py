"""Authentication-failure throttle: an address that keeps presenting keys that do not resolve is refused before lookup.

A key's checksum is public, so well-formed made-up keys are cheap to generate, and each fresh one would cost a
database query. Failures that cost a lookup (unknown, revoked, inactive or expired key) are counted per client
address (an IPv6 address by its /64, which one client usually holds whole) in a fixed window shared by every
worker through Redis. Past ``GATEWAY_AUTH_FAILURE_LIMIT`` failures in ``GATEWAY_AUTH_FAILURE_WINDOW_SECONDS``, the
worker that saw it refuses that address with 429 until the window ends, without any lookup, unless the key is
already in the worker's cache (a valid key seen lately keeps working, at no cost). Every worker learns it on its
own next failure from that address, so a flood reaches the database at most about ``limit + workers`` times per
window (plus the requests already in flight).

Cost: nothing on a request with a valid cached key (one dict lookup, only while some address is blocked); one
Redis round trip per counted failure. When Redis is down each worker counts alone (``limit`` per worker).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time

import redis
from django.conf import settings

from apimgmt.redis_client import get_redis

logger = logging.getLogger(__name__)

# Failures that cost a key lookup (cache, Redis, database). Missing, malformed or duplicate credentials cost none.
COUNTED_REASONS = frozenset({"unknown", "revoked", "inactive", "expired"})
# Bounds on the per-worker maps (cleared whole when full: a flood from many addresses must not grow memory).
MAX_ADDRESSES = 50_000


def throttle_scope(address: str) -> str:
    """What failures are counted by: the IPv4 address, or the /64 of an IPv6 address. An IPv4 client shown as
    IPv4-mapped IPv6 (``::ffff:a.b.c.d``, from a dual-stack listener) is its IPv4 address, not ``::/64``, which
    would count every IPv4 client together."""
    if ":" not in address:
        return address
    try:
        network = ipaddress.IPv6Network(f"{address}/64", strict=False)
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped is not None else str(network)


class AuthFailureThrottle:
    """Counts key failures per client address and remembers, per worker, which addresses are refused until when."""

    def __init__(self) -> None:
        self.limit = int(settings.GATEWAY["AUTH_FAILURE_LIMIT"])
        self.window = max(1, int(settings.GATEWAY["AUTH_FAILURE_WINDOW_SECONDS"]))
        # scope -> time.time() at which the refusal ends (read without the lock on the hot path).
        self.blocked: dict[str, float] = {}
        # Counting without Redis: scope -> (window start, failures).
        self.local: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may present unknown keys again; None when it is not refused."""
        until = self.blocked.get(throttle_scope(address))
        if until is None:
            return None
        left = until - time.time()
        if left <= 0:
            with self.lock:
                self.blocked.pop(throttle_scope(address), None)
            return None
        return max(1, math.ceil(left))

    def failed(self, address: str) -> int | None:
        """Count one failure of ``address``; when that takes it over the limit, refuse it and return Retry-After."""
        if self.limit <= 0 or not address:
            return None
        scope = throttle_scope(address)
        now = time.time()
        start = int(now // self.window) * self.window
        count = self._count_in_redis(scope, start)
        if count is None:
            count = self._count_here(scope, start)
        if count <= self.limit:
            return None
        end = start + self.window
        with self.lock:
            # Ended refusals go now: while any entry is left, every request pays a look at this map.
            for stale in [s for s, until in self.blocked.items() if until <= now]:
                del self.blocked[stale]
            if len(self.blocked) >= MAX_ADDRESSES:
                self.blocked.clear()
            self.blocked[scope] = end
        return max(1, math.ceil(end - now))

    def _count_in_redis(self, scope: str, start: int) -> int | None:
        client = get_redis()
        if client is None:
            return None
        # The window start in the name: a new window starts from zero, and the key goes a window after its last use.
        key = f"auth_failures:{{{scope}}}:{start}"
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 2 * self.window)
            count, _ = pipe.execute()
        except redis.RedisError:
            logger.warning("authentication failures cannot be counted in Redis; counting in this worker")
            return None
        return int(count)

    def _count_here(self, scope: str, start: int) -> int:
        with self.lock:
            if len(self.local) >= MAX_ADDRESSES:
                self.local.clear()
            window_start, count = self.local.get(scope, (start, 0))
            count = count + 1 if window_start == start else 1
            self.local[scope] = (start, count)
        return count
