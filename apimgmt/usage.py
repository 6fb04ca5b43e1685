"""The usage flusher: copies the gateway's minute buckets from Redis into am_usage_records and its rollups, exactly once.

Each round, per tenant: claim minutes (a script renames each minute's hash to a claimed name with a fresh token, so
later increments start a new hash), read the claimed hashes, and in ONE database transaction record the tokens in
``am_usage_copies`` (a token already there was copied before: skipped) and add the buckets to the minute, hour and
day tables and to the hour and day totals per tenant, API and consumer; commit; then delete the claimed hashes. A crash before the commit leaves the claim to be taken over when
its lease ends; a crash after it finds the token recorded. Two flushers on the same claim meet on the token's
primary key: one commits, the other skips. Work, Redis memory and database rows all follow buckets, never requests.
Layout of the Redis side: apimgmt/usage_buckets.py.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
import zoneinfo
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Q

from apimgmt import redis_client, usage_partitions
from apimgmt import usage_buckets as contract
from apimgmt.models import ApiKey, Tenant

logger = logging.getLogger("apimgmt.usage")

# A minute is copied once it is over plus this much (gateway workers send their buckets about once a second).
DEFAULT_CLOSE_GRACE = timedelta(seconds=3)
# A claim not released this long after it was taken belongs to a flusher that stopped; another one takes it over.
DEFAULT_LEASE = timedelta(seconds=60)
# Minutes (of one tenant) per database transaction.
DEFAULT_BATCH_SIZE = 20
# Copy tokens are remembered this long (a claim lives seconds; this is a wide margin).
COPY_TOKEN_RETENTION = timedelta(days=2)
# Keys' last_used_at is written at most this often (it is a hint for humans, not an audit trail).
LAST_USED_RESOLUTION = timedelta(minutes=1)
# A following flusher also reads which keys the minute in progress has buckets for, this often, so a key's "last used"
# shows a call within about this long (its minute is copied only once it is over: up to 64 s later).
OPEN_MINUTE_PEEK_SECONDS = 15.0
TENANT_CACHE_SECONDS = 60.0
# The previous release's per-request stream, still written by old gateways during a rolling upgrade.
LEGACY_STREAM = "usage:events"
LEGACY_BATCH = 5000
# Delete counted entries; the stream itself once it is empty (old gateways recreate it if they still write).
LEGACY_DELETE_SCRIPT = """
redis.call('XDEL', KEYS[1], unpack(ARGV))
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
"""

_ROWS_PER_STATEMENT = 1000
_ARRAY_ROWS_PER_STATEMENT = 20_000
# The usage tables' columns for contract.METRICS, in its order (microseconds become milliseconds and seconds).
_METRIC_COLUMNS = (
    "request_count",
    "error_count",
    "bytes_in",
    "bytes_out",
    "latency_ms_sum",
    "latency_ms_max",
    "upstream_latency_ms_sum",
    "connection_count",
    "connection_seconds",
    "messages_in",
    "messages_out",
)
# Which of them are floating point; the others are counts (bigint).
_FLOAT_COLUMNS = frozenset({"latency_ms_sum", "latency_ms_max", "upstream_latency_ms_sum", "connection_seconds"})
_FLOAT_INDEXES = frozenset(i for i, name in enumerate(_METRIC_COLUMNS) if name in _FLOAT_COLUMNS)
# Bucket numbers in microseconds, and what to divide them by for their column.
_SCALED = ((4, 1000.0), (5, 1000.0), (6, 1000.0), (contract.CONNECTION_US, 1_000_000.0))
# The three tables a bucket is added to: minute rows, UTC hours, days in the tenant's time zone.
TABLES = ("am_usage_records", "am_usage_hourly", "am_usage_daily")
# ... and the hourly and daily totals of the tenant, each API and each consumer (tenant-wide pages read these).
TOTAL_TABLES = ("am_usage_hourly_totals", "am_usage_daily_totals")
_BUCKET_KEY = (
    ("tenant_id", "varchar"),
    ("api_id", "varchar"),
    ("consumer_id", "varchar"),
    ("key_id", "varchar"),
    ('"timestamp"', "timestamptz"),
    ("status_code", "smallint"),
)
_DIMENSION_KEY = (
    ("tenant_id", "varchar"),
    ("dimension", "varchar"),
    ("value", "varchar"),
    ('"timestamp"', "timestamptz"),
    ("status_code", "smallint"),
)

CLAIM_SCRIPT = """
-- KEYS[1]: dirty index, KEYS[2]: claims; then per minute its hash and the claimed name.
-- ARGV[1]: now (ms), ARGV[2]: lease end (ms), ARGV[3]: number of minutes n; per minute: minute, claim;
-- then claims of other flushers whose lease may have ended. Returns the claims taken.
local taken = {}
local n = tonumber(ARGV[3])
for i = 1, n do
  local minute, claim = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if redis.call('ZSCORE', KEYS[1], minute) then
    redis.call('ZREM', KEYS[1], minute)
    if redis.call('EXISTS', KEYS[1 + 2 * i]) == 1 then
      redis.call('RENAME', KEYS[1 + 2 * i], KEYS[2 + 2 * i])
      redis.call('ZADD', KEYS[2], ARGV[2], claim)
      taken[#taken + 1] = claim
    end
  end
end
for j = 4 + 2 * n, #ARGV do
  local score = redis.call('ZSCORE', KEYS[2], ARGV[j])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[j])
    taken[#taken + 1] = ARGV[j]
  end
end
return taken
"""

RELEASE_SCRIPT = """
-- KEYS[1]: claims; KEYS[2..]: the claimed hashes, in the order of their claims in ARGV.
for i = 1, #ARGV do
  redis.call('DEL', KEYS[i + 1])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return #ARGV
"""


@dataclass
class FlushStats:
    """What one or more rounds did."""

    minutes: int = 0  # claimed tenant-minutes copied
    buckets: int = 0  # buckets added to am_usage_records
    requests: int = 0  # requests those buckets count
    skipped: int = 0  # claims found already copied (a flusher died after its commit, or two raced)
    dropped: int = 0  # requests of buckets that could not be stored (unknown tenant, malformed)

    def add(self, other: FlushStats) -> None:
        self.minutes += other.minutes
        self.buckets += other.buckets
        self.requests += other.requests
        self.skipped += other.skipped
        self.dropped += other.dropped

    def as_dict(self) -> dict[str, int]:
        return {
            "minutes": self.minutes,
            "buckets": self.buckets,
            "requests": self.requests,
            "skipped": self.skipped,
            "dropped": self.dropped,
        }


Row = tuple[str, str, str, str, datetime, int]  # tenant, api, consumer, key, bucket start, status
Totals = dict[Row, list[float]]


@dataclass(frozen=True)
class Claim:
    tenant: str
    member: str  # "<minute>:<token>"

    @property
    def minute(self) -> int:
        return int(self.member.split(":", 1)[0])

    @property
    def token(self) -> str:
        return self.member


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def flusher_redis(url: str, *, block_ms: int = 1000) -> redis.Redis:
    """A client for the flusher (its own timeouts: a claim script over many buckets may take a while)."""
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


def _add(totals: Totals, row: Row, values: list[float]) -> None:
    existing = totals.get(row)
    if existing is None:
        totals[row] = list(values)
        return
    for i, value in enumerate(values):
        if i == contract.MAX_INDEX:
            existing[i] = max(existing[i], value)
        else:
            existing[i] += value


@dataclass
class UsageFlusher:
    """Copies closed minutes of usage buckets from Redis into PostgreSQL; any number may run at once."""

    client: redis.Redis
    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = DEFAULT_BATCH_SIZE
    close_grace: timedelta = DEFAULT_CLOSE_GRACE
    lease: timedelta = DEFAULT_LEASE
    using: str = DEFAULT_DB_ALIAS
    # Test seams: called inside the transaction just before COMMIT, and right after it (before the release).
    before_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None
    _zones: dict[str, zoneinfo.ZoneInfo] = field(default_factory=dict)
    _zones_at: float = -TENANT_CACHE_SECONDS
    _key_touched: dict[str, datetime] = field(default_factory=dict)
    _peeked_at: float = -OPEN_MINUTE_PEEK_SECONDS
    # Claims this flusher took whose copy or release failed (a killed database connection, a Redis timeout): retried
    # by this flusher on its next pass, not left for another one to take over when the lease ends a minute later. A
    # retry of a copy whose COMMIT did land finds its tokens in am_usage_copies and adds nothing.
    _unfinished: dict[str, list[Claim]] = field(default_factory=dict)
    _claim_script: Any = None
    _release_script: Any = None
    _legacy_script: Any = None

    # -- a round ---------------------------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        return sorted(_text(t) for t in self.client.smembers(contract.TENANTS_KEY))

    def flush_once(self, *, closed_only: bool = True) -> FlushStats:
        """One pass over every tenant: copy each one's minutes that are ready (all of them with closed_only=False)."""
        total = FlushStats()
        if self.client.exists(LEGACY_STREAM):
            total.add(self.drain_legacy_stream())
        tenants = self.tenants()
        random.shuffle(tenants)  # several flushers start on different tenants
        tenants += [t for t in self._unfinished if t not in tenants]
        for tenant in tenants:
            while True:
                stats = self.flush_tenant(tenant, closed_only=closed_only)
                total.add(stats)
                if stats.minutes + stats.skipped < self.batch_size:
                    break
        if closed_only:
            self.touch_keys_in_progress(tenants)
        return total

    def touch_keys_in_progress(self, tenants: Sequence[str]) -> int:
        """Set last_used_at for the keys the minute in progress has buckets for, at most every
        OPEN_MINUTE_PEEK_SECONDS: only the buckets' names are read (HKEYS), nothing in Redis is claimed or changed,
        and the minute is still copied once it is over. One UPDATE for all the keys; returns how many it saw."""
        if not tenants or time.monotonic() - self._peeked_at < OPEN_MINUTE_PEEK_SECONDS:
            return 0
        self._peeked_at = time.monotonic()
        minute = contract.minute_of(time.time())
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hkeys(contract.minute_key(tenant, minute))
        start = datetime.fromtimestamp(minute, tz=UTC)
        used: dict[str, datetime] = {}
        for names in pipe.execute():
            for name in names:
                try:
                    key = contract.Dimension.parse(_text(name)).key
                except ValueError:
                    continue  # malformed: the copy of the minute reports it
                if key:
                    used[key] = start
        self._touch_keys(used)
        return len(used)

    def drain(self) -> FlushStats:
        """Copy everything there is now, the minute in progress too (its later requests are copied later)."""
        self.ensure_partitions()
        total = self.flush_once(closed_only=False)
        total.add(self.drain_legacy_stream())
        self.forget_copy_tokens()
        return total

    def flush_tenant(self, tenant: str, *, closed_only: bool = True, before: float | None = None) -> FlushStats:
        """Claim up to batch_size minutes of one tenant, copy them in one transaction, then release them.

        ``before`` (epoch s): only minutes starting earlier (the benchmark's compressed time).
        """
        claims = self._unfinished.pop(tenant, None) or self._claim(tenant, closed_only=closed_only, before=before)
        if not claims:
            return FlushStats()
        try:
            contents = self._read(claims)
            stats = self._copy(tenant, contents)
            if self.after_commit is not None:
                self.after_commit()
            self._release(tenant, claims)
        except BaseException:
            self._unfinished[tenant] = claims
            raise
        return stats

    def drain_legacy_stream(self) -> FlushStats:
        """Count the per-request events gateways of the previous release appended to ``usage:events``, once.

        During a rolling upgrade the old gateways still write that stream. Each batch of entries is stored in one
        transaction with a copy token naming its first and last entry (read again after a crash: the same entries
        from the stream's head, the same token, skipped), then deleted from the stream.
        """
        total = FlushStats()
        while True:
            entries = self.client.xrange(LEGACY_STREAM, count=LEGACY_BATCH)
            if not entries:
                return total
            ids = [_text(entry_id) for entry_id, _fields in entries]
            stats = FlushStats()
            minutes: Totals = {}
            zones: dict[str, zoneinfo.ZoneInfo] = {}
            for _entry_id, fields in entries:
                event = _legacy_event(fields or {})
                zone = self._zone(event[0][0]) if event else None
                if event is None or zone is None:
                    stats.dropped += 1
                    continue
                row, values = event
                zones[row[0]] = zone
                _add(minutes, row, values)
                stats.requests += 1
            self.ensure_partitions(row[4] for row in minutes)
            connection = connections[self.using]
            with transaction.atomic(using=self.using), connection.cursor() as cursor:
                now_value = connection.ops.adapt_datetimefield_value(datetime.now(tz=UTC))
                cursor.execute(
                    "INSERT INTO am_usage_copies (token, tenant_id, minute, copied_at) VALUES (%s, '', %s, %s) "
                    "ON CONFLICT (token) DO NOTHING RETURNING token",
                    [f"legacy:{ids[0]}:{ids[-1]}", now_value, now_value],
                )
                if cursor.fetchone() is None:
                    stats = FlushStats(skipped=1)
                else:
                    self._store(cursor, minutes, zones)
                    stats.buckets = len(minutes)
                if self.before_commit is not None:
                    self.before_commit()
            if self.after_commit is not None:
                self.after_commit()
            if self._legacy_script is None or self._legacy_script.registered_client is not self.client:
                self._legacy_script = self.client.register_script(LEGACY_DELETE_SCRIPT)
            self._legacy_script(keys=[LEGACY_STREAM], args=ids)
            total.add(stats)
            logger.info("usage events of the previous release counted", extra=stats.as_dict())

    # -- Redis -------------------------------------------------------------------------------------------------------

    def _claim(self, tenant: str, *, closed_only: bool, before: float | None = None) -> list[Claim]:
        now = time.time()
        ready_until = now - 60 - self.close_grace.total_seconds() if closed_only else float("inf")
        if before is not None:
            ready_until = min(ready_until, before - 1)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(contract.dirty_key(tenant), "-inf", ready_until, start=0, num=self.batch_size)
        pipe.zrangebyscore(contract.claims_key(tenant), "-inf", int(now * 1000), start=0, num=self.batch_size)
        minutes_raw, stale_raw = pipe.execute()
        minutes = [_text(m) for m in minutes_raw]
        stale = [_text(m) for m in stale_raw]
        if not minutes and not stale:
            return []
        keys = [contract.dirty_key(tenant), contract.claims_key(tenant)]
        args: list[Any] = [int(now * 1000), int((now + self.lease.total_seconds()) * 1000), len(minutes)]
        for minute in minutes:
            member = f"{minute}:{secrets.token_hex(10)}"
            keys += [contract.minute_key(tenant, int(minute)), contract.claimed_key(tenant, member)]
            args += [minute, member]
        args += stale
        if self._claim_script is None or self._claim_script.registered_client is not self.client:
            self._claim_script = self.client.register_script(CLAIM_SCRIPT)
        taken = self._claim_script(keys=keys, args=args)
        return [Claim(tenant, _text(member)) for member in taken]

    def _read(self, claims: list[Claim]) -> list[tuple[Claim, dict[Any, Any]]]:
        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            pipe.hgetall(contract.claimed_key(claim.tenant, claim.member))
        return list(zip(claims, pipe.execute(), strict=True))

    def _release(self, tenant: str, claims: list[Claim]) -> None:
        """Delete the copied hashes and their claims, atomically (one script: one slot, also on Redis Cluster)."""
        if self._release_script is None or self._release_script.registered_client is not self.client:
            self._release_script = self.client.register_script(RELEASE_SCRIPT)
        keys = [contract.claims_key(tenant), *[contract.claimed_key(tenant, c.member) for c in claims]]
        self._release_script(keys=keys, args=[c.member for c in claims])

    # -- PostgreSQL ------------------------------------------------------------------------------------------------

    def _zone(self, tenant: str) -> zoneinfo.ZoneInfo | None:
        """The tenant's time zone (None: the tenant no longer exists). Reloaded every minute, and on a miss."""
        age = time.monotonic() - self._zones_at
        if age > TENANT_CACHE_SECONDS or (tenant not in self._zones and age > 1.0):
            self._zones = {}
            for tenant_id, name in Tenant.objects.using(self.using).values_list("id", "timezone"):
                try:
                    self._zones[tenant_id] = zoneinfo.ZoneInfo(name)
                except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                    self._zones[tenant_id] = zoneinfo.ZoneInfo("UTC")
            self._zones_at = time.monotonic()
        return self._zones.get(tenant)

    def _copy(self, tenant: str, contents: list[tuple[Claim, dict[Any, Any]]]) -> FlushStats:
        stats = FlushStats()
        zone = self._zone(tenant)
        if zone is None:
            dropped = sum(_requests(fields) for _claim, fields in contents)
            logger.warning("usage of %d requests dropped: tenant %s no longer exists", dropped, tenant)
            stats.dropped += dropped
            return stats
        months = {datetime.fromtimestamp(claim.minute, tz=UTC) for claim, _fields in contents}
        self.ensure_partitions(months)
        connection = connections[self.using]
        with transaction.atomic(using=self.using), connection.cursor() as cursor:
            fresh = self._record_tokens(cursor, tenant, [claim for claim, _ in contents])
            minutes: Totals = {}
            used: dict[str, datetime] = {}
            for claim, fields in contents:
                if claim.token not in fresh:
                    stats.skipped += 1
                    continue
                stats.minutes += 1
                start = datetime.fromtimestamp(claim.minute, tz=UTC)
                for raw_field, raw_value in fields.items():
                    try:
                        dimension = contract.Dimension.parse(_text(raw_field))
                        numbers = contract.decode(_text(raw_value))
                    except ValueError:
                        logger.warning("usage bucket %r of %s dropped: malformed", _text(raw_field), tenant)
                        continue
                    values = [float(v) for v in numbers]
                    for i, divisor in _SCALED:  # microseconds -> the columns' milliseconds or seconds
                        values[i] /= divisor
                    d = dimension
                    _add(minutes, (tenant, d.api, d.consumer, d.key, start, d.status), values)
                    stats.requests += numbers[0]
                    if d.key and start > used.get(d.key, start - timedelta(1)):
                        used[d.key] = start
            stats.buckets = len(minutes)
            self._store(cursor, minutes, {tenant: zone})
            self._touch_keys(used)
            if self.before_commit is not None:
                self.before_commit()
        return stats

    def _store(self, cursor: Any, minutes: Totals, zones: dict[str, zoneinfo.ZoneInfo]) -> None:
        """Add minute rows to am_usage_records, their hours and days to the rollups, and those to the totals."""
        hours: Totals = {}
        days: Totals = {}
        for (tenant, api, consumer, key, start, status), values in minutes.items():
            hour, day = hour_and_day(start, zones[tenant])
            _add(hours, (tenant, api, consumer, key, hour, status), values)
            _add(days, (tenant, api, consumer, key, day, status), values)
        for table, totals in zip(TABLES, (minutes, hours, days), strict=True):
            upsert_totals(cursor, table, totals, using=self.using)
        for table, totals in zip(TOTAL_TABLES, (hours, days), strict=True):
            upsert_totals(cursor, table, dimension_totals(totals), using=self.using)

    def _record_tokens(self, cursor: Any, tenant: str, claims: Sequence[Claim]) -> set[str]:
        """Insert the claims' tokens; the ones returned were not copied before (so they are copied now)."""
        connection = connections[self.using]
        copied_at = connection.ops.adapt_datetimefield_value(datetime.now(tz=UTC))
        values = ", ".join(["(%s, %s, %s, %s)"] * len(claims))
        params: list[Any] = []
        for claim in sorted(claims, key=lambda c: c.token):
            minute = connection.ops.adapt_datetimefield_value(datetime.fromtimestamp(claim.minute, tz=UTC))
            params += [claim.token, tenant, minute, copied_at]
        cursor.execute(
            f"INSERT INTO am_usage_copies (token, tenant_id, minute, copied_at) VALUES {values} "  # noqa: S608
            "ON CONFLICT (token) DO NOTHING RETURNING token",
            params,
        )
        return {row[0] for row in cursor.fetchall()}

    def _touch_keys(self, used: dict[str, datetime]) -> None:
        """Set the keys' last_used_at (one statement), at most once a minute per key across all flushers."""
        due = []
        for key_id, used_at in sorted(used.items()):
            previous = self._key_touched.get(key_id)
            if previous is None or used_at - previous >= LAST_USED_RESOLUTION:
                due.append((key_id, used_at))
                self._key_touched[key_id] = used_at
        if len(self._key_touched) > 100_000:
            self._key_touched.clear()
        for start in range(0, len(due), _ROWS_PER_STATEMENT):
            chunk = due[start : start + _ROWS_PER_STATEMENT]
            if connections[self.using].vendor != "postgresql":
                for key_id, used_at in chunk:
                    ApiKey.objects.using(self.using).filter(key_id=key_id).filter(
                        Q(last_used_at__isnull=True) | Q(last_used_at__lte=used_at - LAST_USED_RESOLUTION)
                    ).update(last_used_at=used_at)
                continue
            with connections[self.using].cursor() as cursor:
                # The condition makes it at most once a minute across all flushers, not just this one.
                cursor.execute(
                    "UPDATE am_api_keys SET last_used_at = v.used_at "
                    "FROM unnest(%s::varchar[], %s::timestamptz[]) AS v (key_id, used_at) "
                    "WHERE am_api_keys.key_id = v.key_id AND "
                    "(am_api_keys.last_used_at IS NULL OR am_api_keys.last_used_at <= v.used_at - interval '1 minute')",
                    [[key_id for key_id, _ in chunk], [used_at for _, used_at in chunk]],
                )

    # -- housekeeping ------------------------------------------------------------------------------------------------

    def ensure_partitions(self, moments: Iterable[datetime] = ()) -> None:
        """The partitions for these moments, this month and the next two exist (created ahead, not on demand)."""
        today = datetime.now(tz=UTC)
        usage_partitions.ensure(
            [today, *(usage_partitions.add_months(today, n) for n in (1, 2)), *moments], using=self.using
        )

    def forget_copy_tokens(self) -> int:
        """Delete copy tokens far older than any claim can live."""
        cutoff = connections[self.using].ops.adapt_datetimefield_value(datetime.now(tz=UTC) - COPY_TOKEN_RETENTION)
        with connections[self.using].cursor() as cursor:
            cursor.execute("DELETE FROM am_usage_copies WHERE copied_at < %s", [cutoff])
            return int(cursor.rowcount)

    def lag_seconds(self) -> float:
        """How long the oldest minute waiting to be copied has been closed (0 when nothing waits)."""
        tenants = self.tenants()
        if not tenants:
            return 0.0
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zrange(contract.dirty_key(tenant), 0, 0, withscores=True)
            pipe.zrange(contract.claims_key(tenant), 0, 0)
        replies = pipe.execute()
        oldest = float("inf")
        for i in range(0, len(replies), 2):
            for _member, score in replies[i]:
                oldest = min(oldest, float(score))
            for member in replies[i + 1]:
                oldest = min(oldest, float(_text(member).split(":", 1)[0]))
        if oldest == float("inf"):
            return 0.0
        return max(0.0, time.time() - (oldest + 60 + self.close_grace.total_seconds()))

    def backlog_minutes(self) -> int:
        """Tenant-minutes in Redis not yet copied (closed or not), claimed ones included."""
        tenants = self.tenants()
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zcard(contract.dirty_key(tenant))
            pipe.zcard(contract.claims_key(tenant))
        return int(sum(pipe.execute())) if tenants else 0


def _legacy_event(fields: dict[Any, Any]) -> tuple[Row, list[float]] | None:
    """A ``usage:events`` entry of the previous release as a minute row and its numbers (None: not countable)."""
    data = {_text(k): _text(v) for k, v in fields.items()}
    try:
        ts = float(data["ts"])
        status = int(data["status"])
        latency = float(data.get("latency_ms") or 0)
        upstream = float(data.get("upstream_ms") or 0)
        values = [1.0, 1.0 if status >= 500 else 0.0, float(int(float(data.get("bytes_in") or 0)))]
        values += [float(int(float(data.get("bytes_out") or 0))), latency, latency, upstream]
        values += [0.0] * (len(_METRIC_COLUMNS) - len(values))  # that release had no WebSocket numbers
        row: Row = (
            data["tenant"],
            data.get("api", ""),
            data.get("consumer", ""),
            data.get("key", ""),
            datetime.fromtimestamp(contract.minute_of(ts), tz=UTC),
            status,
        )
    except (KeyError, ValueError, OverflowError, OSError):
        return None
    lengths = dict(zip(("tenant", "api", "consumer", "key"), row[:4], strict=True))
    if not row[0] or not 100 <= status <= 599 or any(len(v) > contract.MAX_LENGTHS[k] for k, v in lengths.items()):
        return None
    return row, values


def _requests(fields: dict[Any, Any]) -> int:
    total = 0
    for value in fields.values():
        try:
            total += contract.decode(_text(value))[0]
        except ValueError:
            continue
    return total


def upsert_totals(cursor: Any, table: str, totals: Totals, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Add ``totals`` to one usage table (an upsert per row that adds, keeping the maximum a maximum)."""
    connection = connections[using]
    keys = _DIMENSION_KEY if table in TOTAL_TABLES else _BUCKET_KEY
    width = len(keys) + len(_METRIC_COLUMNS)
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    updates = ", ".join(
        f"{c} = {greatest}({table}.{c}, EXCLUDED.{c})" if c == "latency_ms_max" else f"{c} = {table}.{c} + EXCLUDED.{c}"
        for c in _METRIC_COLUMNS
    )
    # A fixed row order means concurrent flushers lock rows in the same order (no deadlocks).
    rows = sorted(totals.items(), key=lambda item: item[0])
    insert = f"INSERT INTO {table} ({', '.join(name for name, _ in keys)}, {', '.join(_METRIC_COLUMNS)}) "
    conflict = f"ON CONFLICT ({', '.join(name for name, _ in keys)}) DO UPDATE SET {updates}"
    if connection.vendor == "postgresql":
        # One array per column, one short statement: no per-row placeholders for the driver to parse.
        types = [sql_type for _, sql_type in keys] + [
            "float8" if name in _FLOAT_COLUMNS else "bigint" for name in _METRIC_COLUMNS
        ]
        unnest = "SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in types) + ") "  # noqa: S608
        for start in range(0, len(rows), _ARRAY_ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ARRAY_ROWS_PER_STATEMENT]
            columns: list[list[Any]] = [[] for _ in range(width)]
            for key, v in chunk:
                for i, value in enumerate(key):
                    columns[i].append(value)
                for i in range(len(_METRIC_COLUMNS)):
                    columns[len(keys) + i].append(v[i] if i in _FLOAT_INDEXES else int(v[i]))
            cursor.execute(insert + unnest + conflict, columns)  # table and column names are ours
        return
    placeholders = "(" + ", ".join(["%s"] * width) + ")"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        params: list[Any] = []
        for key, v in chunk:
            params += [connection.ops.adapt_datetimefield_value(k) if isinstance(k, datetime) else k for k in key]
            params += [v[i] if i in _FLOAT_INDEXES else int(v[i]) for i in range(len(_METRIC_COLUMNS))]
        cursor.execute(insert + f"VALUES {', '.join([placeholders] * len(chunk))} " + conflict, params)


def dimension_totals(totals: Totals) -> Totals:
    """Per-key rollup rows summed for the whole tenant, each API and each consumer (the totals tables' rows)."""
    result: Totals = {}
    for (tenant, api, consumer, _key, bucket, status), values in totals.items():
        for dimension, value in (("tenant", ""), ("api", api), ("consumer", consumer)):
            _add(result, (tenant, dimension, value, bucket, status), values)  # type: ignore[arg-type]
    return result


def hour_and_day(minute: datetime, zone: zoneinfo.ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC hour and the tenant's local day (as the instant of its midnight) a minute belongs to."""
    local = minute.astimezone(zone)
    return minute.replace(minute=0, second=0, microsecond=0), datetime(
        local.year, local.month, local.day, tzinfo=zone
    ).astimezone(UTC)


def add_minute(
    *,
    tenant_id: str,
    timestamp: datetime | str,
    status_code: int,
    api_id: str = "",
    consumer_id: str = "",
    key_id: str = "",
    request_count: int = 0,
    error_count: int = 0,
    bytes_in: int = 0,
    bytes_out: int = 0,
    latency_ms_sum: float = 0.0,
    latency_ms_max: float = 0.0,
    upstream_latency_ms_sum: float = 0.0,
    connection_count: int = 0,
    connection_seconds: float = 0.0,
    messages_in: int = 0,
    messages_out: int = 0,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """Add one minute's totals to am_usage_records and its hourly and daily rollups, the way the flusher does.

    For loading history (imports, fixtures): the same columns as a UsageRecord.
    """
    from django.utils.dateparse import parse_datetime

    minute = parse_datetime(timestamp) if isinstance(timestamp, str) else timestamp
    if minute is None or minute.tzinfo is None:
        raise ValueError(f"timestamp must be an aware datetime, not {timestamp!r}")
    minute = minute.astimezone(UTC).replace(second=0, microsecond=0)
    name = Tenant.objects.using(using).values_list("timezone", flat=True).get(id=tenant_id)
    try:
        zone = zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    hour, day = hour_and_day(minute, zone)
    usage_partitions.ensure([minute, day], using=using)
    values = [request_count, error_count, bytes_in, bytes_out, latency_ms_sum, latency_ms_max, upstream_latency_ms_sum]
    values += [connection_count, connection_seconds, messages_in, messages_out]
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        for table, bucket in zip(TABLES, (minute, hour, day), strict=True):
            row: Totals = {(tenant_id, api_id, consumer_id, key_id, bucket, status_code): [float(v) for v in values]}
            upsert_totals(cursor, table, row, using=using)
            if table != "am_usage_records":
                upsert_totals(cursor, TOTAL_TABLES[table == "am_usage_daily"], dimension_totals(row), using=using)
