"""Prometheus metrics of the gateway (names are part of the product; see docs/operations)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets sized for a proxy: sub-millisecond overhead up to long upstream calls.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Requests that match no API are labelled api="unmatched" (never the raw path: unbounded cardinality).
UNMATCHED = "unmatched"

requests_total = Counter(
    "api_requests_total", "Requests answered by the gateway.", ["tenant", "api", "method", "status"]
)
request_duration = Histogram(
    "api_request_duration_seconds", "Time from request to the end of the response.", ["tenant", "api"], buckets=_BUCKETS
)
upstream_duration = Histogram(
    "api_upstream_duration_seconds",
    "Time until the upstream's response headers arrived.",
    ["tenant", "api"],
    buckets=_BUCKETS,
)
rate_limited_total = Counter(
    "api_rate_limited_total",
    "Requests over a rate limit or quota (mode=shadow: would have been blocked).",
    ["api", "policy", "mode"],
)
auth_failures_total = Counter("api_auth_failures_total", "Requests refused by key authentication.", ["api", "reason"])

# Reasons whose answers a client cannot tell apart share one label, or the metric would undo what the shared answer
# hides (whether a key ever existed, was revoked or expired; whether a valid key belongs to another tenant); an
# operator who needs to know which looks the key up (docs/operations.md, "Key validation failures"). missing,
# malformed and duplicate stay apart: the client knows what it sent (the key checksum is public).
AUTH_FAILURE_LABELS = {
    "unknown": "invalid_key",
    "revoked": "invalid_key",
    "inactive": "invalid_key",
    "expired": "invalid_key",
    "wrong_tenant": "not_subscribed",
}


def count_auth_failure(api_id: str, reason: str) -> None:
    auth_failures_total.labels(api_id, AUTH_FAILURE_LABELS.get(reason, reason)).inc()


auth_throttled_total = Counter(
    "api_auth_throttled_total",
    "Requests refused with 429 because their address had too many authentication failures (no key looked up).",
    ["api"],
)
ratelimit_store_errors_total = Counter(
    "api_ratelimit_store_errors_total",
    "Rate-limit decisions taken without Redis, by on_store_error (open, closed, local).",
    ["decision"],
)
circuit_open = Gauge(
    "api_circuit_open",
    "1 while a worker's circuit breaker for the API is open (max over workers).",
    ["api"],
    multiprocess_mode="max",
)
# Invalidation (apimgmt/invalidation.py): route-level changes rebuild the route table; key-level changes evict keys.
route_table_loads_total = Counter(
    "api_route_table_loads_total", "Route tables a worker built (a route-level change, the periodic safety reload)."
)
key_cache_evictions_total = Counter(
    "api_key_cache_evictions_total", "Keys dropped from a worker's key cache because the control plane changed them."
)
key_cache_lost_total = Counter(
    "api_key_cache_lost_total", "Times a worker dropped every cached key because evictions may have been missed."
)
key_cache_misses_total = Counter(
    "api_key_cache_misses_total", "Key lookups that went past the worker's cache (to Redis, then the database)."
)
usage_spooled_events = Counter(
    "api_usage_spooled_events", "Usage events written to the local spool because Redis was unavailable."
)
# WebSocket (gateway/websocket.py): labels are the API id and a fixed direction, nothing the client chooses.
websocket_connections = Gauge(
    "api_websocket_connections",
    "Open WebSocket connections relayed by the gateway (summed over live workers).",
    ["api"],
    multiprocess_mode="livesum",
)
websocket_messages_total = Counter(
    "api_websocket_messages_total",
    "WebSocket messages relayed: direction=in from clients to the upstream, out from the upstream to clients.",
    ["api", "direction"],
)
websocket_connection_seconds = Counter(
    "api_websocket_connection_seconds",
    "Seconds WebSocket connections were open, added when each one ends.",
    ["api"],
)

# -- the policy chain (gateway/policies/*, gateway/jwks.py) --------------------------------------------------------
# Labels are ids and fixed words, never what a client sent (an origin, an address, a path, a claim): the number of
# series is bounded by the configuration. An API without these policies has none of their series and pays nothing;
# a response_cache step binds its children when the route table is built (one .inc() per request), and refusals
# find theirs in a dict (they are the rare path).
CACHE_RESULTS = ("hit", "miss", "bypass", "skip")
cache_lookups_total = Counter(
    "api_cache_lookups_total",
    "Requests of APIs with a response_cache policy: hit (answered from Redis), miss (looked up, not found), bypass "
    "(the client asked for a fresh answer, or Redis was unavailable), skip (not cacheable: a method other than "
    "GET/HEAD, a body, a WebSocket upgrade).",
    ["tenant", "api", "result"],
)


def cache_lookup_children(tenant: str, api: str) -> dict[str, Any]:
    """result -> the bound counter child of one API (bound once per route-table build, incremented per request)."""
    return {result: cache_lookups_total.labels(tenant, api, result) for result in CACHE_RESULTS}


# The reasons a policy type refuses with: a small fixed set per type (anything else is counted as "other").
REFUSAL_REASONS: dict[str, frozenset[str]] = {
    "cors": frozenset({"origin", "method", "headers"}),  # a preflight: 403 cors-refused
    "ip_rules": frozenset({"deny", "not_allowed", "unreadable", "unavailable"}),  # 403 ip-refused, 503 unavailable
    "request_limits": frozenset({"method", "body", "headers"}),  # 405, 413, 431
}
# request_limits' reason by the status it answers with.
REQUEST_LIMIT_REASONS = {405: "method", 413: "body", 431: "headers"}
policy_refusals_total = Counter(
    "api_policy_refusals_total",
    "Requests a policy refused (mode=shadow: would have refused, let through), by policy type and a fixed reason.",
    ["tenant", "api", "policy_type", "reason", "mode"],
)
_refusal_children: dict[tuple[str, str, str, str, str], Any] = {}


def count_refusal(tenant: str, api: str, policy_type: str, reason: str, mode: str = "enforce") -> None:
    """One refusal (``mode="shadow"``: one a shadow policy would have made)."""
    key = (tenant, api, policy_type, reason, mode)
    child = _refusal_children.get(key)
    if child is None:
        if reason not in REFUSAL_REASONS.get(policy_type, ()):
            reason = "other"
        child = policy_refusals_total.labels(tenant, api, policy_type, reason, mode)
        if len(_refusal_children) >= 10_000:
            _refusal_children.clear()
        _refusal_children[key] = child
    child.inc()


JWKS_RESULTS = ("ok", "unchanged", "error")
jwks_fetches_total = Counter(
    "api_jwks_fetches_total",
    "JWKS fetches of JWT issuers with a jwks_url: ok (a new key set), unchanged (the same set), error (none usable; "
    "the last good set is kept).",
    ["tenant", "issuer_id", "result"],
)
jwks_last_success = Gauge(
    "api_jwks_last_success_timestamp_seconds",
    "When a worker last fetched the issuer's JWKS successfully (Unix time; the newest over workers).",
    ["tenant", "issuer_id"],
    multiprocess_mode="max",
)


def count_jwks_fetch(tenant: str, issuer_id: str, result: str) -> None:
    """One JWKS fetch (rare: at most one per issuer a minute and worker, plus retries every few seconds without keys)."""
    jwks_fetches_total.labels(tenant, issuer_id, result).inc()
    if result != "error":
        jwks_last_success.labels(tenant, issuer_id).set(time.time())
