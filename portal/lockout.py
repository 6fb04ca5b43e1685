"""Sign-in lockout for the portal: failure counters per account and per client IP in the shared cache.

Why our own and not django-axes: axes brings its own tables, middleware and
authentication backend for the whole site (admin included) and keys lockouts on
its own request parsing; the portal needs two counters with a cool-off, which the
cache (Redis in production, so every worker agrees) does in a few lines. A wrong
password increments both counters; once either reaches its limit, every attempt —
even with the right password — is refused until the cool-off has passed. Success
clears the account's counter, not the IP's, so one good account can't launder an
address that is guessing others' passwords. When the cache is unreachable the
lockout fails open (logged): passwords are still checked, nobody is locked out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

_PREFIX = "portal:login"
logger = logging.getLogger("portal")


def _account_key(username: str) -> str:
    # Hashed so user names never appear in cache keys (and case cannot dodge the counter).
    digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
    return f"{_PREFIX}:account:{digest}"


def _ip_key(ip: str) -> str:
    return f"{_PREFIX}:ip:{ip}"


@dataclass(frozen=True)
class LockState:
    locked: bool
    retry_after_seconds: int


def _count(key: str) -> int:
    try:
        value = cache.get(key)
    except Exception:  # the cache backend's own errors (django-redis raises its ConnectionInterrupted)
        # Fail open: the password is still checked, and a Redis outage must not lock every developer out.
        logger.warning("portal lockout counters unavailable; sign-in allowed without lockout", exc_info=True)
        return 0
    return int(value) if value is not None else 0


def check(*, username: str, ip: str) -> LockState:
    """Is this account or address locked out right now?"""
    account_locked = _count(_account_key(username)) >= settings.PORTAL_LOGIN_ACCOUNT_FAILURES
    ip_locked = _count(_ip_key(ip)) >= settings.PORTAL_LOGIN_IP_FAILURES
    if account_locked or ip_locked:
        return LockState(locked=True, retry_after_seconds=settings.PORTAL_LOGIN_LOCKOUT_SECONDS)
    return LockState(locked=False, retry_after_seconds=0)


def _bump(key: str, limit: int) -> None:
    window = settings.PORTAL_LOGIN_LOCKOUT_SECONDS
    # add() starts the counting window at the first failure; incr() keeps its expiry.
    if cache.add(key, 1, timeout=window):
        count = 1
    else:
        try:
            count = cache.incr(key)
        except ValueError:  # expired between add() and incr()
            cache.add(key, 1, timeout=window)
            count = 1
    if count >= limit:
        # The lock itself lasts a full cool-off from the failure that tripped it.
        cache.touch(key, timeout=window)


def record_failure(*, username: str, ip: str) -> None:
    try:
        _bump(_account_key(username), settings.PORTAL_LOGIN_ACCOUNT_FAILURES)
        _bump(_ip_key(ip), settings.PORTAL_LOGIN_IP_FAILURES)
    except Exception:
        logger.warning("portal lockout counters unavailable; a failed sign-in was not counted", exc_info=True)


def record_success(*, username: str) -> None:
    try:
        cache.delete(_account_key(username))
    except Exception:
        logger.warning("portal lockout counters unavailable; could not clear an account's failures", exc_info=True)
