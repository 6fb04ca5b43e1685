"""The rate-limit contract between gateway and control plane: windows, counter scope, key layout, what is left.

One function, ``counter_windows``, turns a policy's config into windows (limits, GCRA arithmetic, calendar bounds in
the tenant's zone, Redis keys), and one, ``counter_scope``, says whose counter a request touches. The gateway
(gateway/ratelimit.py, ratelimit.lua) counts with them; the portal (portal/quota.py) reads the same keys with them
to show "quota left right now"; so writer and reader cannot drift. Layout, per policy window and scope:

- sliding ``rate_limiting`` windows (GCRA): ``rate_limit:{<tenant>}:<policy_id>:<label>:<scope>``
  holding the theoretical arrival time in epoch microseconds;
- fixed ``rate_limiting`` windows and ``quota`` windows (calendar counters):
  ``rate_limit:{<tenant>}:<policy_id>:<label>@<window start, epoch s>:<scope>`` holding a count.

Nothing here writes to Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import redis

from apimgmt import redis_client

# Config field -> (window label, seconds) of a rate_limiting policy.
RATE_WINDOWS = {
    "requests_per_second": ("second", 1),
    "requests_per_minute": ("minute", 60),
    "requests_per_hour": ("hour", 3600),
    "requests_per_day": ("day", 86400),
}
# Config field -> window label of a quota policy (calendar days and months in the tenant's zone).
QUOTA_WINDOWS = {"requests_per_day": "day", "requests_per_month": "month"}
_RATE_LABELS = {name: label for name, (label, _seconds) in RATE_WINDOWS.items()}
_CALENDAR_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# What a policy's counter is shared by (config "key_extraction"), and the default when a config names none.
DEFAULT_SCOPE = "consumer_id"
SCOPES = ("consumer_id", "key_id", "ip", "tenant_id", "api")


@dataclass(frozen=True)
class CounterWindow:
    policy_id: str
    policy_name: str
    label: str  # second, minute, hour, day, month
    sliding: bool
    limit: int  # capacity (limit + burst) for sliding windows
    period: float  # window length in seconds (calendar: this window's, e.g. a 23-hour day at a DST switch)
    interval_us: float  # sliding: microseconds one request costs
    end: float  # calendar: window end, epoch seconds
    key: str


@dataclass(frozen=True)
class Remaining:
    window: CounterWindow
    remaining: int
    resets_in_seconds: int  # sliding: until the bucket is full again; calendar: until the window ends


def key_prefix(tenant_id: str, policy_id: str) -> str:
    """The part of every counter key a policy owns; the tenant is the hash tag (one Redis Cluster slot)."""
    return f"{redis_client.tenant_tag('rate_limit', tenant_id)}:{policy_id}"


def sliding_key(prefix: str, label: str, scope: str) -> str:
    """A sliding (GCRA) window's key: one per policy, window and scope, holding the theoretical arrival time."""
    return f"{prefix}:{label}:{scope}"


def calendar_key(prefix: str, label: str, start: float, scope: str) -> str:
    """A calendar window's key: named by the window's start, so a new window starts from zero by itself."""
    return f"{prefix}:{label}@{int(start)}:{scope}"


def scope_of(config: dict[str, Any]) -> str:
    """The policy's counter scope (one of SCOPES)."""
    return str(config.get("key_extraction") or DEFAULT_SCOPE)


def counter_scope(
    config: dict[str, Any], *, tenant_id: str, api_id: str, consumer_id: str, key_id: str, client_ip: str
) -> str:
    """The scope value of a request's counter: whose requests share it (the last part of the Redis key)."""
    scope = scope_of(config)
    if scope == "key_id":
        return key_id
    if scope == "ip":
        return client_ip
    if scope == "tenant_id":
        return tenant_id
    if scope == "api":
        return api_id
    return consumer_id


def calendar_bounds(label: str, tz_name: str, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds) of the calendar window containing ``now``."""
    if label in ("second", "minute", "hour") or (label == "day" and tz_name == "UTC"):
        period = _CALENDAR_SECONDS[label]
        start = math.floor(now / period) * period
        return start, start + period
    tz = ZoneInfo(tz_name)
    local = datetime.fromtimestamp(now, tz)
    first: date
    begin: float
    if label == "day":
        first = local.date()
        following = first + timedelta(days=1)
    else:
        first = local.date().replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    begin = datetime(first.year, first.month, first.day, tzinfo=tz).timestamp()
    end = datetime(following.year, following.month, following.day, tzinfo=tz).timestamp()
    return begin, end


def counter_windows(
    *,
    tenant_id: str,
    tz_name: str,
    policy_id: str,
    policy_name: str,
    policy_type: str,
    config: dict[str, Any],
    scope: str,
    now: float,
) -> list[CounterWindow]:
    """Every window of one policy for one scope value, with the Redis key the gateway counts it under.

    The only place a policy config becomes windows: ``sliding`` rate limits are GCRA buckets of capacity
    limit + burst_size refilled at one request per period / limit; ``fixed`` rate limits and quotas are calendar
    counters (days and months in ``tz_name``).
    """
    prefix = key_prefix(tenant_id, policy_id)
    sliding = policy_type == "rate_limiting" and config.get("window_type", "sliding") == "sliding"
    fields = _RATE_LABELS if policy_type == "rate_limiting" else QUOTA_WINDOWS
    windows: list[CounterWindow] = []
    for name, label in fields.items():
        limit = config.get(name)
        if not limit:
            continue
        if sliding:
            seconds = RATE_WINDOWS[name][1]
            capacity = int(limit) + int(config.get("burst_size") or 0)
            interval = seconds * 1e6 / int(limit)
            key = sliding_key(prefix, label, scope)
            windows.append(CounterWindow(policy_id, policy_name, label, True, capacity, seconds, interval, 0.0, key))
        else:
            start, end = calendar_bounds(label, tz_name, now)
            key = calendar_key(prefix, label, start, scope)
            windows.append(CounterWindow(policy_id, policy_name, label, False, int(limit), end - start, 0.0, end, key))
    return windows


def read_remaining(client: redis.Redis, windows: list[CounterWindow]) -> list[Remaining]:
    """What each window still allows, on Redis's clock (as the gateway counts), in one round trip."""
    if not windows:
        return []
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.mget([w.key for w in windows])
    (seconds, micros), values = pipe.execute()
    now_us = int(seconds) * 1_000_000 + int(micros)
    results: list[Remaining] = []
    for window, raw in zip(windows, values, strict=True):
        stored = float(raw) if raw is not None else 0.0
        if window.sliding:
            tolerance = window.limit * window.interval_us
            tat = max(stored, now_us)
            remaining = max(0, math.floor((tolerance - (tat - now_us)) / window.interval_us))
            resets = math.ceil((tat - now_us) / 1e6)
        else:
            remaining = max(0, window.limit - int(stored))
            resets = max(0, math.ceil(window.end - now_us / 1e6))
        results.append(Remaining(window, min(remaining, window.limit), resets))
    return results
