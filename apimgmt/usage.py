"""The usage flusher: aggregates the gateway's usage events from a Redis stream into minute buckets, exactly once."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Q
from django.utils.timezone import now

from apimgmt import redis_client
from apimgmt.models import ApiKey, Tenant

logger = logging.getLogger("apimgmt.usage")

STREAM_KEY = "usage:events"
GROUP = "usage-flushers"

DEFAULT_BATCH_SIZE = 500
# A pending entry untouched this long belongs to a flusher that died; another one takes it over.
DEFAULT_CLAIM_IDLE = timedelta(seconds=60)
# Processed request ids are remembered this long. Events older than the window cannot be
# deduplicated any more, so they are dropped rather than risk being counted twice.
DEFAULT_SEEN_RETENTION = timedelta(days=7)
# Keys' last_used_at is written at most this often (it is a hint for humans, not an audit trail).
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Consumers of the group with nothing pending and idle this long are forgotten (dead flushers).
FORGET_CONSUMERS_AFTER = timedelta(hours=1)

_ROWS_PER_STATEMENT = 500
_MAX = {"rid": 128, "tenant": 63, "api": 32, "consumer": 32, "key": 32}


@dataclass(frozen=True)
class UsageEvent:
    """One gateway request as the stream carries it (see the usage-event contract)."""

    entry_id: str
    rid: str
    ts: float
    tenant: str
    api: str
    consumer: str
    key: str
    status: int
    bytes_in: int
    bytes_out: int
    latency_ms: float
    upstream_ms: float | None

    @property
    def bucket(self) -> datetime:
        return datetime.fromtimestamp(math.floor(self.ts / 60) * 60, tz=UTC)


@dataclass
class FlushStats:
    """What one or more batches did: every entry read ends up counted, a duplicate, or dropped."""

    read: int = 0
    counted: int = 0
    duplicates: int = 0
    dropped: int = 0
    buckets: int = 0

    def add(self, other: FlushStats) -> None:
        self.read += other.read
        self.counted += other.counted
        self.duplicates += other.duplicates
        self.dropped += other.dropped
        self.buckets += other.buckets

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "counted": self.counted,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "buckets": self.buckets,
        }


@dataclass
class _Bucket:
    request_count: int = 0
    error_count: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0
    upstream_latency_ms_sum: float = 0.0


BucketKey = tuple[str, str, str, str, datetime, int]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def parse_event(entry_id: str, fields: dict[Any, Any]) -> UsageEvent | None:
    """The event in a stream entry, or None (with a warning) when it cannot be counted."""
    data = {_text(k): _text(v) for k, v in fields.items()}
    try:
        upstream = data.get("upstream_ms", "")
        event = UsageEvent(
            entry_id=entry_id,
            rid=data.get("rid") or f"stream:{entry_id}",
            ts=float(data["ts"]),
            tenant=data["tenant"],
            api=data.get("api", ""),
            consumer=data.get("consumer", ""),
            key=data.get("key", ""),
            status=int(data["status"]),
            bytes_in=int(float(data.get("bytes_in") or 0)),
            bytes_out=int(float(data.get("bytes_out") or 0)),
            latency_ms=float(data.get("latency_ms") or 0),
            upstream_ms=float(upstream) if upstream else None,
        )
    except (KeyError, ValueError) as exc:
        logger.warning("usage event %s dropped: malformed (%s)", entry_id, exc.__class__.__name__)
        return None
    too_long = [name for name, limit in _MAX.items() if len(getattr(event, name)) > limit]
    if too_long or not event.tenant or not (100 <= event.status <= 599) or not math.isfinite(event.ts):
        logger.warning("usage event %s dropped: invalid %s", entry_id, ", ".join(too_long) or "tenant/status/ts")
        return None
    return event


def aggregate(events: Iterable[UsageEvent]) -> dict[BucketKey, _Bucket]:
    """Minute buckets per (tenant, api, consumer, key, minute, status).

    ``error_count`` counts server errors (status >= 500), the same definition as the
    HighErrorRate alert; 4xx answers are visible per status code.
    """
    buckets: dict[BucketKey, _Bucket] = {}
    for event in events:
        key = (event.tenant, event.api, event.consumer, event.key, event.bucket, event.status)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        bucket.request_count += 1
        bucket.error_count += 1 if event.status >= 500 else 0
        bucket.bytes_in += event.bytes_in
        bucket.bytes_out += event.bytes_out
        bucket.latency_ms_sum += event.latency_ms
        bucket.latency_ms_max = max(bucket.latency_ms_max, event.latency_ms)
        bucket.upstream_latency_ms_sum += event.upstream_ms or 0.0
    return buckets


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _next_stream_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _stream_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def flusher_redis(url: str, *, block_ms: int) -> redis.Redis:
    """A client for the flusher: its blocking reads need a socket timeout longer than the block."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    # Any REDIS_URL form (standalone, redis+sentinel://, redis+cluster://), through the one client factory.
    return redis_client.client_for_url(
        url,
        socket_timeout=block_ms / 1000 + 2.0,
        connect_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
    )


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class UsageFlusher:
    """Reads ``usage:events`` as a member of the ``usage-flushers`` group and writes ``am_usage_records``.

    Order per batch: count in one database transaction (the request ids into
    ``am_usage_seen`` and the bucket upserts together), commit, then XACK. A crash
    before the commit leaves the entries pending (re-read or reclaimed later); a crash
    after the commit and before the XACK re-delivers entries whose ids are already seen,
    so they are skipped. Either way every event is counted exactly once.
    """

    client: redis.Redis
    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = DEFAULT_BATCH_SIZE
    claim_idle: timedelta = DEFAULT_CLAIM_IDLE
    seen_retention: timedelta = DEFAULT_SEEN_RETENTION
    stream: str = STREAM_KEY
    group: str = GROUP
    using: str = DEFAULT_DB_ALIAS
    # Test seams: called inside the transaction just before COMMIT, and right after it (before XACK).
    before_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None
    _claim_cursor: str = "0-0"
    _key_touched: dict[str, datetime] = field(default_factory=dict)

    # -- reading -----------------------------------------------------------------

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _with_group(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except redis.ResponseError as exc:
            # The group vanishes when Redis restarts without persistence: recreate it and go on.
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return call()

    def _read_group(self, start: str, block_ms: int | None) -> list[tuple[str, dict[Any, Any] | None]]:
        reply = self._with_group(
            lambda: self.client.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=self.batch_size, block=block_ms
            )
        )
        entries: list[tuple[str, dict[Any, Any] | None]] = []
        for _stream, items in reply or []:
            entries.extend((_text(entry_id), fields) for entry_id, fields in items)
        return entries

    def read_batch(self, block_ms: int | None = None) -> list[tuple[str, dict[Any, Any] | None]]:
        """Next entries to count: our own unacknowledged ones, then stale ones of dead flushers, then new ones."""
        own = self._read_group("0", None)
        if own:
            return own
        claimed = self._autoclaim()
        if claimed:
            return claimed
        return self._read_group(">", block_ms)

    def _autoclaim(self) -> list[tuple[str, dict[Any, Any] | None]]:
        reply = self._with_group(
            lambda: self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.claim_idle.total_seconds() * 1000),
                start_id=self._claim_cursor,
                count=self.batch_size,
            )
        )
        next_cursor, items = reply[0], reply[1]
        self._claim_cursor = _text(next_cursor)
        entries = [(_text(entry_id), fields) for entry_id, fields in items]
        if entries:
            logger.info("reclaimed %d pending usage events of a stopped flusher", len(entries))
        return entries

    # -- counting ------------------------------------------------------------------

    def process(self, entries: Sequence[tuple[str, dict[Any, Any] | None]]) -> FlushStats:
        """Count a batch in one transaction, commit, then acknowledge it."""
        stats = FlushStats(read=len(entries))
        events: dict[str, UsageEvent] = {}
        oldest_countable = time.time() - self.seen_retention.total_seconds()
        for entry_id, fields in entries:
            # An entry deleted from the stream while pending comes back without fields.
            event = parse_event(entry_id, fields) if fields else None
            if event is not None and event.ts < oldest_countable:
                logger.warning("usage event %s dropped: older than the deduplication window", entry_id)
                event = None
            if event is None:
                stats.dropped += 1
            elif event.rid in events:
                stats.duplicates += 1
            else:
                events[event.rid] = event
        if events:
            self._count(events, stats)
            if self.after_commit is not None:
                self.after_commit()
        if entries:
            self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return stats

    def _count(self, events: dict[str, UsageEvent], stats: FlushStats) -> None:
        connection = connections[self.using]
        with transaction.atomic(using=self.using):
            with connection.cursor() as cursor:
                fresh = self._mark_seen(cursor, sorted(events))
                stats.duplicates += len(events) - len(fresh)
                counted = [events[rid] for rid in sorted(fresh)]
                known = set(
                    Tenant.objects.using(self.using)
                    .filter(id__in={e.tenant for e in counted})
                    .values_list("id", flat=True)
                )
                unknown = [e for e in counted if e.tenant not in known]
                if unknown:
                    # A deleted tenant's usage has nowhere to go; it must not block the stream.
                    logger.warning("%d usage events dropped: tenant no longer exists", len(unknown))
                    stats.dropped += len(unknown)
                    counted = [e for e in counted if e.tenant in known]
                buckets = aggregate(counted)
                self._upsert(cursor, buckets)
                stats.counted += len(counted)
                stats.buckets += len(buckets)
            self._touch_keys(counted)
            if self.before_commit is not None:
                self.before_commit()

    def _mark_seen(self, cursor: Any, rids: Sequence[str]) -> set[str]:
        """Insert the request ids; the ones returned were not seen before (so they are counted now)."""
        fresh: set[str] = set()
        seen_at = connections[self.using].ops.adapt_datetimefield_value(now())
        for chunk in _chunks(rids, 1000):
            values = ", ".join(["(%s, %s)"] * len(chunk))
            params: list[Any] = []
            for rid in chunk:
                params += [rid, seen_at]
            cursor.execute(
                f"INSERT INTO am_usage_seen (request_id, seen_at) VALUES {values} "  # noqa: S608 (placeholders only)
                "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                params,
            )
            fresh.update(row[0] for row in cursor.fetchall())
        return fresh

    def _upsert(self, cursor: Any, buckets: dict[BucketKey, _Bucket]) -> None:
        connection = connections[self.using]
        if connection.vendor == "postgresql":
            conflict, greatest = "ON CONSTRAINT uniq_usage_bucket", "GREATEST"
        else:
            conflict, greatest = '(tenant_id, api_id, consumer_id, key_id, "timestamp", status_code)', "MAX"
        # A fixed row order means concurrent flushers lock buckets in the same order (no deadlocks).
        rows = sorted(buckets.items(), key=lambda item: item[0])
        for chunk in _chunks(rows, _ROWS_PER_STATEMENT):
            values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(chunk))
            params: list[Any] = []
            for (tenant, api, consumer, key, minute, status), b in chunk:
                params += [
                    tenant,
                    api,
                    consumer,
                    key,
                    connection.ops.adapt_datetimefield_value(minute),
                    status,
                    b.request_count,
                    b.error_count,
                    b.bytes_in,
                    b.bytes_out,
                    b.latency_ms_sum,
                    b.latency_ms_max,
                    b.upstream_latency_ms_sum,
                ]
            cursor.execute(
                'INSERT INTO am_usage_records (tenant_id, api_id, consumer_id, key_id, "timestamp", status_code, '  # noqa: S608
                "request_count, error_count, bytes_in, bytes_out, latency_ms_sum, latency_ms_max, "
                f"upstream_latency_ms_sum) VALUES {values} ON CONFLICT {conflict} DO UPDATE SET "
                "request_count = am_usage_records.request_count + EXCLUDED.request_count, "
                "error_count = am_usage_records.error_count + EXCLUDED.error_count, "
                "bytes_in = am_usage_records.bytes_in + EXCLUDED.bytes_in, "
                "bytes_out = am_usage_records.bytes_out + EXCLUDED.bytes_out, "
                "latency_ms_sum = am_usage_records.latency_ms_sum + EXCLUDED.latency_ms_sum, "
                f"latency_ms_max = {greatest}(am_usage_records.latency_ms_max, EXCLUDED.latency_ms_max), "
                "upstream_latency_ms_sum = am_usage_records.upstream_latency_ms_sum + EXCLUDED.upstream_latency_ms_sum",
                params,
            )

    def _touch_keys(self, events: Sequence[UsageEvent]) -> None:
        latest: dict[str, float] = {}
        for event in events:
            if event.key and event.ts > latest.get(event.key, 0.0):
                latest[event.key] = event.ts
        for key_id, ts in sorted(latest.items()):
            used_at = datetime.fromtimestamp(ts, tz=UTC)
            previous = self._key_touched.get(key_id)
            if previous is not None and used_at - previous < LAST_USED_RESOLUTION:
                continue
            # The condition makes it at most once a minute across all flushers, not just this one.
            ApiKey.objects.using(self.using).filter(key_id=key_id).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lte=used_at - LAST_USED_RESOLUTION)
            ).update(last_used_at=used_at)
            self._key_touched[key_id] = used_at
        if len(self._key_touched) > 100_000:
            self._key_touched.clear()

    # -- housekeeping --------------------------------------------------------------

    def trim(self) -> int:
        """Delete stream entries every group has acknowledged; never one that is pending or undelivered."""
        try:
            names = sorted(_text(group["name"]) for group in self.client.xinfo_groups(self.stream))
        except redis.ResponseError:
            return 0  # no stream yet
        if not names:
            return 0
        # Delivery positions and pending lists in one MULTI, so no entry can be read in between
        # and slip past both.
        pipe = self.client.pipeline(transaction=True)
        pipe.xinfo_groups(self.stream)
        for name in names:
            pipe.xpending(self.stream, name)
        groups, *pendings = pipe.execute()
        if sorted(_text(group["name"]) for group in groups) != names:
            return 0  # a group came or went meanwhile; trim next time
        bounds = [_next_stream_id(_text(group.get("last-delivered-id", "0-0"))) for group in groups]
        bounds += [_text(pending["min"]) for pending in pendings if pending.get("pending")]
        if not bounds:
            return 0
        min_id = min(bounds, key=_stream_id_key)
        if min_id == "0-1":
            return 0
        trimmed = int(self.client.xtrim(self.stream, minid=min_id, approximate=False))
        if trimmed:
            logger.debug("trimmed %d acknowledged usage events", trimmed)
        return trimmed

    def purge_seen(self, *, chunk: int = 10_000) -> int:
        """Forget processed request ids older than the retention window (in chunks: short locks)."""
        cutoff = connections[self.using].ops.adapt_datetimefield_value(now() - self.seen_retention)
        deleted = 0
        while True:
            with connections[self.using].cursor() as cursor:
                cursor.execute(
                    "DELETE FROM am_usage_seen WHERE request_id IN "
                    "(SELECT request_id FROM am_usage_seen WHERE seen_at < %s LIMIT %s)",
                    [cutoff, chunk],
                )
                count = cursor.rowcount
            deleted += count
            if count < chunk:
                return deleted

    def forget_idle_consumers(self) -> int:
        """Remove group members with nothing pending that have been idle for long (stopped flushers)."""
        try:
            members = self.client.xinfo_consumers(self.stream, self.group)
        except redis.ResponseError:
            return 0
        forgotten = 0
        idle_ms = FORGET_CONSUMERS_AFTER.total_seconds() * 1000
        for member in members:
            name = _text(member["name"])
            if name != self.consumer and not member.get("pending") and member.get("idle", 0) > idle_ms:
                self.client.xgroup_delconsumer(self.stream, self.group, name)
                forgotten += 1
        return forgotten

    def backlog(self) -> int:
        """Events not yet acknowledged: pending plus not yet delivered (Redis 7's group lag)."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0
        for group in groups:
            if _text(group["name"]) == self.group:
                lag = group.get("lag")
                return int(group.get("pending", 0)) + (int(lag) if lag is not None else 0)
        return int(self.client.xlen(self.stream))

    # -- loops -----------------------------------------------------------------------

    def flush_once(self, block_ms: int | None = None) -> FlushStats:
        """Read and count one batch."""
        entries = self.read_batch(block_ms)
        if not entries:
            return FlushStats()
        return self.process(entries)

    def drain(self) -> FlushStats:
        """Count everything there is now (including stale pending entries), then trim and clean up."""
        self.ensure_group()
        total = FlushStats()
        while True:
            stats = self.flush_once()
            total.add(stats)
            if not stats.read:
                break
        self.trim()
        self.purge_seen()
        return total
