"""The flusher counts every usage event exactly once, acknowledges only what is stored, and keeps the stream short."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apimgmt.models import ApiKey, Consumer, Tenant, UsageEventSeen, UsageRecord
from apimgmt.usage import GROUP, STREAM_KEY, UsageFlusher, flusher_redis
from tests.usage.helpers import (
    emit,
    emitted_counts,
    make_event,
    mixed_events,
    pending_count,
    stored_counts,
    stored_total,
)


@pytest.fixture
def flusher(redis_client: redis.Redis, acme: Tenant) -> UsageFlusher:
    return UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer="test-flusher", batch_size=64)


def test_every_event_is_stored_once_in_its_minute_bucket(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    events = mixed_events(500)
    emit(redis_client, events)

    stats = flusher.drain()

    assert stats.counted == 500 and stats.duplicates == 0 and stats.dropped == 0
    assert stored_counts() == emitted_counts(events)
    assert redis_client.xlen(STREAM_KEY) == 0, "acknowledged entries are trimmed"
    assert pending_count(redis_client) == 0


def test_a_bucket_sums_bytes_and_latency_and_keeps_the_maximum(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    minute = int(time.time()) // 60 * 60
    emit(redis_client, [make_event(ts=minute + 1, latency_ms=10), make_event(ts=minute + 59, latency_ms=30)])
    emit(redis_client, [make_event(ts=minute + 60, latency_ms=5)])

    flusher.drain()

    first, second = UsageRecord.objects.order_by("timestamp")
    assert first.timestamp == datetime.fromtimestamp(minute, tz=UTC)
    assert (first.request_count, first.bytes_in, first.bytes_out) == (2, 20, 200)
    assert (first.latency_ms_sum, first.latency_ms_max, first.upstream_latency_ms_sum) == (40, 30, 10)
    assert second.timestamp == datetime.fromtimestamp(minute + 60, tz=UTC)
    assert second.request_count == 1


def test_later_batches_add_to_an_existing_bucket(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    ts = time.time()
    emit(redis_client, [make_event(ts=ts, latency_ms=10)])
    flusher.drain()
    emit(redis_client, [make_event(ts=ts, latency_ms=50), make_event(ts=ts, latency_ms=20)])
    flusher.drain()

    (record,) = UsageRecord.objects.all()
    assert record.request_count == 3
    assert record.latency_ms_sum == 80
    assert record.latency_ms_max == 50


def test_server_errors_count_as_errors(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    emit(redis_client, [make_event(status=502), make_event(status=503), make_event(status=429)])
    flusher.drain()

    errors = {r.status_code: r.error_count for r in UsageRecord.objects.all()}
    assert errors == {502: 1, 503: 1, 429: 0}


def test_a_replayed_event_is_not_counted_twice(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    events = mixed_events(50)
    emit(redis_client, events)
    flusher.drain()
    # A spool replay (or a gateway retry) writes the same request ids again, as new stream entries.
    emit(redis_client, [*events[:20], events[0]])

    stats = flusher.drain()

    assert stats.duplicates == 21 and stats.counted == 0
    assert stored_counts() == emitted_counts(events)


def test_unacknowledged_entries_are_read_again_after_a_failed_batch(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    events = mixed_events(64)
    emit(redis_client, events)

    def fail() -> None:
        raise RuntimeError("database went away")

    flusher.before_commit = fail
    with pytest.raises(RuntimeError):
        flusher.flush_once()
    assert stored_total() == 0
    assert pending_count(redis_client) == 64, "nothing is acknowledged unless it was committed"

    flusher.before_commit = None
    flusher.drain()
    assert stored_counts() == emitted_counts(events)


def test_pending_events_of_a_dead_flusher_are_reclaimed(
    flusher: UsageFlusher, redis_client: redis.Redis, acme: Tenant
) -> None:
    events = mixed_events(30)
    emit(redis_client, events)
    flusher.ensure_group()
    # A flusher that read the entries and died before counting them.
    redis_client.xreadgroup(GROUP, "dead-flusher", {STREAM_KEY: ">"}, count=100)
    assert pending_count(redis_client) == 30

    flusher.claim_idle = timedelta(milliseconds=200)
    assert flusher.drain().counted == 0, "entries of a live flusher (recently read) are left alone"
    time.sleep(0.3)
    assert flusher.drain().counted == 30

    assert stored_counts() == emitted_counts(events)
    assert pending_count(redis_client) == 0


def test_trimming_never_removes_an_unacknowledged_entry(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    flusher.ensure_group()
    emit(redis_client, mixed_events(10))
    flusher.drain()
    emit(redis_client, mixed_events(5))
    held = redis_client.xreadgroup(GROUP, "slow-flusher", {STREAM_KEY: ">"}, count=5)[0][1]
    emit(redis_client, mixed_events(7))  # not delivered to anyone yet

    flusher.trim()

    remaining = [entry_id for entry_id, _ in redis_client.xrange(STREAM_KEY)]
    assert remaining == [entry_id for entry_id, _ in held] + remaining[5:]
    assert len(remaining) == 12


def test_trimming_respects_other_consumer_groups(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    flusher.ensure_group()
    redis_client.xgroup_create(STREAM_KEY, "analytics", id="0")
    emit(redis_client, mixed_events(10))
    flusher.drain()

    assert redis_client.xlen(STREAM_KEY) == 10, "the analytics group has not read them yet"


def test_malformed_events_and_unknown_tenants_are_dropped_without_blocking_the_stream(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    good = mixed_events(5)
    emit(redis_client, good[:2])
    redis_client.xadd(STREAM_KEY, {"rid": "bad-1", "ts": "not-a-number", "tenant": "acme", "status": "200"})
    redis_client.xadd(STREAM_KEY, {"rid": "bad-2", "ts": str(time.time()), "tenant": "acme"})
    emit(redis_client, [make_event(tenant="deleted-tenant")])
    emit(redis_client, good[2:])

    stats = flusher.drain()

    assert (stats.counted, stats.dropped) == (5, 3)
    assert stored_counts() == emitted_counts(good)
    assert redis_client.xlen(STREAM_KEY) == 0 and pending_count(redis_client) == 0


def test_events_older_than_the_dedup_window_are_dropped(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    flusher.seen_retention = timedelta(hours=1)
    emit(redis_client, [make_event(ts=time.time() - 7200), make_event()])

    stats = flusher.drain()

    assert (stats.counted, stats.dropped) == (1, 1)


def test_processed_request_ids_are_forgotten_after_the_retention_window(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    emit(redis_client, mixed_events(3))
    flusher.drain()
    UsageEventSeen.objects.create(request_id="old", seen_at=datetime.now(tz=UTC) - timedelta(days=8))

    assert flusher.purge_seen() == 1
    assert UsageEventSeen.objects.count() == 3


def test_last_used_at_follows_traffic_at_most_once_a_minute(
    flusher: UsageFlusher, redis_client: redis.Redis, bob_key: tuple[ApiKey, str]
) -> None:
    key, _ = bob_key
    t0 = time.time() - 600
    emit(redis_client, [make_event(key=key.key_id, ts=t0)])
    flusher.drain()
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(round(t0, 3), tz=UTC)

    with CaptureQueriesContext(connection) as queries:
        emit(redis_client, [make_event(key=key.key_id, ts=t0 + 30)])
        flusher.drain()
    assert not [q for q in queries if "am_api_keys" in q["sql"]], "a second use within the minute writes nothing"
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(round(t0, 3), tz=UTC)

    emit(redis_client, [make_event(key=key.key_id, ts=t0 + 90)])
    flusher.drain()
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(round(t0 + 90, 3), tz=UTC)


def test_flush_usage_command_reports_what_it_counted(
    redis_client: redis.Redis, acme: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    emit(redis_client, mixed_events(12))

    call_command("flush_usage")

    assert "counted 12 events" in capsys.readouterr().out
    assert stored_total() == 12


def test_flush_usage_refuses_to_run_without_redis(settings: object) -> None:
    settings.REDIS_URL = None  # type: ignore[attr-defined]
    with pytest.raises(CommandError, match="REDIS_URL is not set"):
        call_command("flush_usage")


def test_consumer_ids_survive_in_records_even_without_a_consumer_row(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    # Usage history is kept by id: deleting a consumer must not make its past traffic vanish.
    assert not Consumer.objects.filter(id="con_gone").exists()
    emit(redis_client, [make_event(consumer="con_gone", key="")])
    flusher.drain()
    assert UsageRecord.objects.get().consumer_id == "con_gone"
