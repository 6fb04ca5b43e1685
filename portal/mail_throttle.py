"""Throttle for the mails anyone can make the portal send (sign-up, re-sign-up, password reset): per address and per IP.

Without it, the sign-up and password-reset forms let anybody send unlimited mail to any
address. Counters live in the shared cache (Redis in production, so every worker
agrees), like portal/lockout.py: at most PORTAL_MAIL_ADDRESS_LIMIT requests for one
address per PORTAL_MAIL_ADDRESS_WINDOW_SECONDS and PORTAL_MAIL_IP_LIMIT from one client
IP per PORTAL_MAIL_IP_WINDOW_SECONDS. Every valid request counts, whether or not the
address has an account (and so whether or not a mail actually leaves), so being throttled
says nothing about who has an account. A request the IP limit refuses does not count
against the address: one noisy client cannot use up a stranger's allowance beyond its own.
Addresses never appear in cache keys or logs: keys hold a keyed hash, logs the hash's
first characters and the domain. When the cache is unreachable the throttle fails open
(logged): mail is sent, unthrottled, rather than nobody being able to sign up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.utils.crypto import salted_hmac

_PREFIX = "portal:mail"
_HASH_SALT = "portal.mail-throttle"
logger = logging.getLogger("portal")


def _normalise(email: str) -> str:
    # One inbox, one counter: case and a "+tag" (sub-addressing, supported by most providers) cannot dodge it.
    local, _, domain = email.strip().lower().rpartition("@")
    return f"{local.split('+', 1)[0] or local}@{domain}"


def address_digest(email: str) -> str:
    """A keyed hash of the normalised address: stable, but no address can be read or guessed back from it."""
    return salted_hmac(_HASH_SALT, _normalise(email)).hexdigest()[:32]


def _address_key(email: str) -> str:
    return f"{_PREFIX}:address:{address_digest(email)}"


def _ip_key(ip: str) -> str:
    return f"{_PREFIX}:ip:{ip}"


@dataclass(frozen=True)
class MailThrottle:
    throttled: bool
    retry_after_seconds: int


def _bump(key: str, window: int) -> int:
    # add() starts a fixed window at the first request; incr() keeps its expiry, so the window never slides.
    if cache.add(key, 1, timeout=window):
        return 1
    try:
        return int(cache.incr(key))
    except ValueError:  # expired between add() and incr()
        cache.add(key, 1, timeout=window)
        return 1


def check_and_count(*, email: str, ip: str, purpose: str, tenant_id: str) -> MailThrottle:
    """Count one request to mail this address from this IP; throttled when either is over its limit."""
    try:
        over_ip = _bump(_ip_key(ip), settings.PORTAL_MAIL_IP_WINDOW_SECONDS) > settings.PORTAL_MAIL_IP_LIMIT
        over_address = not over_ip and (
            _bump(_address_key(email), settings.PORTAL_MAIL_ADDRESS_WINDOW_SECONDS) > settings.PORTAL_MAIL_ADDRESS_LIMIT
        )
    except Exception:  # the cache backend's own errors (django-redis raises its ConnectionInterrupted)
        logger.warning("portal mail throttle counters unavailable; mail sent unthrottled", exc_info=True)
        return MailThrottle(throttled=False, retry_after_seconds=0)
    if not (over_ip or over_address):
        return MailThrottle(throttled=False, retry_after_seconds=0)
    logger.warning(
        "portal mail throttled: too many requests for one %s",
        "client address" if over_ip else "e-mail address",
        extra={
            "tenant_id": tenant_id,
            "ip": ip,
            "purpose": purpose,
            "email_hash": address_digest(email)[:12],
            "email_domain": email.rpartition("@")[2].lower(),
        },
    )
    window = settings.PORTAL_MAIL_IP_WINDOW_SECONDS if over_ip else settings.PORTAL_MAIL_ADDRESS_WINDOW_SECONDS
    return MailThrottle(throttled=True, retry_after_seconds=window)


def _notice_key(email: str) -> str:
    return f"{_PREFIX}:notice:{address_digest(email)}"


def check_and_count_notice(*, email: str, tenant_id: str) -> MailThrottle:
    """Count one notice mail (key expiring, quota, …) to this address: at most PORTAL_NOTICE_MAIL_LIMIT per
    PORTAL_NOTICE_MAIL_WINDOW_SECONDS. A counter of its own, so a busy week of notices never uses up the address's
    sign-up and password-reset allowance, nor the other way round. Fails open like the rest of the throttle."""
    window = settings.PORTAL_NOTICE_MAIL_WINDOW_SECONDS
    try:
        over = _bump(_notice_key(email), window) > settings.PORTAL_NOTICE_MAIL_LIMIT
    except Exception:  # the cache backend's own errors
        logger.warning("portal mail throttle counters unavailable; notice mail sent unthrottled", exc_info=True)
        return MailThrottle(throttled=False, retry_after_seconds=0)
    if not over:
        return MailThrottle(throttled=False, retry_after_seconds=0)
    logger.warning(
        "portal notice mail throttled: too many notices for one e-mail address",
        extra={
            "tenant_id": tenant_id,
            "email_hash": address_digest(email)[:12],
            "email_domain": email.rpartition("@")[2].lower(),
        },
    )
    return MailThrottle(throttled=True, retry_after_seconds=window)
