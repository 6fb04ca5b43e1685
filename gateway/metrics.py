"""Prometheus metrics of the gateway (names are part of the product; see docs/operations)."""

from __future__ import annotations

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
