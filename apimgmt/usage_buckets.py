"""The usage contract between gateway and flusher: per-minute bucket hashes in Redis, their keys and their values.

The gateway (gateway/usage.py, gateway/usage.lua) adds each worker's pre-aggregated minute buckets into Redis; the
flusher (apimgmt/usage.py) copies closed minutes into ``am_usage_records``. Both use this module, so writer and reader
cannot drift. Every key of one tenant shares the hash tag ``{<tenant>}``, so each multi-key call stays on one Redis
Cluster slot; the one global key, ``usage:tenants``, is only ever touched by single-key calls.

- ``usage:{<tenant>}:m:<minute>`` (HASH): the minute's buckets. ``<minute>`` is the minute's start in epoch seconds.
  Field: ``<api>\\t<consumer>\\t<key>\\t<status>``. Value: the bucket's numbers, comma-separated, in ``METRICS``
  order (integers: latencies and connection time in microseconds, so sums stay exact). The WebSocket numbers
  (``STREAM_METRICS``) come last and are left out while they are all zero, so a request-only bucket is the seven
  numbers it was before them (a flusher of the previous release still reads it during a rolling upgrade).
- ``usage:{<tenant>}:dirty`` (ZSET): minutes with buckets not yet copied, scored by the minute.
- ``usage:{<tenant>}:w:<worker>`` (STRING): the last flush batch of that gateway worker applied for this tenant
  (batches are numbered per worker; one applied twice — a reply lost, a spool replayed — is recognised and skipped).
- ``usage:{<tenant>}:claims`` (ZSET): minutes a flusher took over for copying, ``<minute>:<token>``, scored by
  the lease's end (epoch ms); the claimed hash was renamed to ``usage:{<tenant>}:c:<minute>:<token>``.
- ``usage:tenants`` (SET): tenants that ever had usage buckets (where the flusher looks).

Nothing here talks to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from apimgmt import redis_client

# A request's numbers (the first seven of a bucket) and a WebSocket connection's (the rest). The bytes of a
# connection's messages each way are in bytes_in and bytes_out of its status-101 bucket.
REQUEST_METRICS = (
    "request_count",
    "error_count",
    "bytes_in",
    "bytes_out",
    "latency_us_sum",
    "latency_us_max",
    "upstream_latency_us_sum",
)
STREAM_METRICS = (
    "connection_count",  # connections opened
    "connection_us",  # time connections were open (microseconds)
    "messages_in",  # messages from clients
    "messages_out",  # messages to clients
)
# A bucket's numbers, in the order of its Redis value.
METRICS = REQUEST_METRICS + STREAM_METRICS
# Index of the one number that is a maximum, not a sum.
MAX_INDEX = METRICS.index("latency_us_max")
CONNECTION_COUNT, CONNECTION_US, MESSAGES_IN, MESSAGES_OUT = (METRICS.index(name) for name in STREAM_METRICS)
FIELD_SEPARATOR = "\t"
TENANTS_KEY = "usage:tenants"
# A gateway worker's applied-batch marker outlives any spool replay we expect (a Redis outage of days).
WORKER_MARK_TTL_SECONDS = 14 * 86400
# Lengths the database columns accept; longer identifiers are never produced by the gateway.
MAX_LENGTHS = {"tenant": 63, "api": 32, "consumer": 32, "key": 32}


def tag(tenant: str) -> str:
    return redis_client.tenant_tag("usage", tenant)


def minute_key(tenant: str, minute: int) -> str:
    return f"{tag(tenant)}:m:{minute}"


def dirty_key(tenant: str) -> str:
    return f"{tag(tenant)}:dirty"


def worker_key(tenant: str, worker: str) -> str:
    return f"{tag(tenant)}:w:{worker}"


def claims_key(tenant: str) -> str:
    return f"{tag(tenant)}:claims"


def claimed_key(tenant: str, claim: str) -> str:
    """The hash a claim (``<minute>:<token>``) renamed the minute to."""
    return f"{tag(tenant)}:c:{claim}"


def minute_of(timestamp: float) -> int:
    """The start of the minute ``timestamp`` (epoch seconds) falls in."""
    return int(timestamp // 60) * 60


@dataclass(frozen=True)
class Dimension:
    """Who a bucket counts: an API, a consumer, a key (empty when unknown) and a status code."""

    api: str
    consumer: str
    key: str
    status: int

    def field(self) -> str:
        return FIELD_SEPARATOR.join((self.api, self.consumer, self.key, str(self.status)))

    @classmethod
    def parse(cls, field: str) -> Dimension:
        api, consumer, key, status = field.split(FIELD_SEPARATOR)
        return cls(api, consumer, key, int(status))


def empty() -> list[int]:
    """A bucket that counts nothing yet."""
    return [0] * len(METRICS)


def encode(values: list[int]) -> str:
    """The Redis value: all numbers, less the WebSocket ones at the end while they are zero."""
    numbers = [int(v) for v in values]
    end = len(numbers)
    while end > len(REQUEST_METRICS) and numbers[end - 1] == 0:
        end -= 1
    return ",".join(str(v) for v in numbers[:end])


def decode(value: str) -> list[int]:
    """All ``METRICS`` of a Redis value (seven numbers, of a request-only bucket, up to all of them)."""
    numbers = [int(v) for v in value.split(",")]
    if not len(REQUEST_METRICS) <= len(numbers) <= len(METRICS):
        raise ValueError(f"a usage bucket has {len(REQUEST_METRICS)} to {len(METRICS)} numbers, not {len(numbers)}")
    return numbers + [0] * (len(METRICS) - len(numbers))


def merge(into: list[int], other: list[int]) -> None:
    """Add ``other`` into ``into`` (the maximum stays a maximum; a shorter ``into`` grows to ``other``'s length)."""
    if len(into) < len(other):
        into.extend([0] * (len(other) - len(into)))
    for i, value in enumerate(other):
        if i == MAX_INDEX:
            if value > into[i]:
                into[i] = value
        else:
            into[i] += value
