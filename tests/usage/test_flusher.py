"""The flusher copies every counted request exactly once, into minute rows and their rollups, and leaves Redis empty."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Max, Sum
from django.test.utils import CaptureQueriesContext

from apimgmt import usage_buckets as contract
from apimgmt import usage_partitions
from apimgmt.models import (
    ApiKey,
    Consumer,
    Tenant,
    UsageCopy,
    UsageDaily,
    UsageDailyTotal,
    UsageHourly,
    UsageHourlyTotal,
    UsageRecord,
)
from apimgmt.usage import UsageFlusher, flusher_redis
from gateway.usage import SCRIPT, Batch, _script_args
from tests.usage.helpers import (
    emit,
    emitted_counts,
    make_event,
    mixed_events,
    stored_counts,
    stored_total,
    waiting_minutes,
)


@pytest.fixture
def flusher(redis_client: redis.Redis, acme: Tenant) -> UsageFlusher:
    return UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer="test-flusher", batch_size=5)


def _usage_keys(client: redis.Redis) -> list[str]:
    """Bucket hashes and claims left in Redis (the per-worker batch markers are not buckets)."""
    return sorted(
        k.decode() for k in client.scan_iter("usage:*") if b":m:" in k or b":c:" in k or k.endswith(b":claims")
    )


def test_every_request_is_stored_once_in_its_minute_bucket(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    now = time.time()
    events = [*mixed_events(300, ts=now - 120), *mixed_events(200, ts=now - 60), *mixed_events(100, ts=now)]
    emit(redis_client, events)

    stats = flusher.drain()

    assert stats.requests == 600 and stats.skipped == 0 and stats.dropped == 0
    assert stored_counts() == emitted_counts(events)
    assert waiting_minutes(redis_client) == 0
    assert _usage_keys(redis_client) == [], "copied buckets leave Redis"


def test_a_worker_sends_one_bucket_per_dimension_and_minute_however_many_requests(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    minute = contract.minute_of(time.time())
    emit(redis_client, [make_event(ts=minute + i * 0.01) for i in range(5000)])

    (field,) = redis_client.hkeys(contract.minute_key("acme", minute))
    assert contract.Dimension.parse(field.decode()) == contract.Dimension("api_users", "con_bob", "key_bob", 200)
    flusher.drain()
    (record,) = UsageRecord.objects.all()
    assert record.request_count == 5000


def test_a_bucket_sums_bytes_and_latency_and_keeps_the_maximum(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    minute = contract.minute_of(time.time())
    emit(redis_client, [make_event(ts=minute + 1, latency_ms=10), make_event(ts=minute + 59, latency_ms=30)])
    emit(redis_client, [make_event(ts=minute + 60, latency_ms=5)])

    flusher.drain()

    first, second = UsageRecord.objects.order_by("timestamp")
    assert first.timestamp == datetime.fromtimestamp(minute, tz=UTC)
    assert (first.request_count, first.bytes_in, first.bytes_out) == (2, 20, 200)
    assert (first.latency_ms_sum, first.latency_ms_max, first.upstream_latency_ms_sum) == (40, 30, 10)
    assert second.timestamp == datetime.fromtimestamp(minute + 60, tz=UTC)
    assert second.request_count == 1


def test_requests_of_a_minute_already_copied_are_added_to_it(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    ts = time.time()
    emit(redis_client, [make_event(ts=ts, latency_ms=10)])
    flusher.drain()
    # Late requests of the same minute (a slow worker, a spool replay): a new hash, copied as an addition.
    emit(redis_client, [make_event(ts=ts, latency_ms=50), make_event(ts=ts, latency_ms=20)])
    flusher.drain()

    (record,) = UsageRecord.objects.all()
    assert record.request_count == 3
    assert record.latency_ms_sum == 80
    assert record.latency_ms_max == 50
    assert UsageHourly.objects.get().request_count == 3 and UsageDaily.objects.get().request_count == 3


def test_server_errors_count_as_errors(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    emit(redis_client, [make_event(status=502), make_event(status=503), make_event(status=429)])
    flusher.drain()

    errors = {r.status_code: r.error_count for r in UsageRecord.objects.all()}
    assert errors == {502: 1, 503: 1, 429: 0}


def test_a_batch_sent_twice_is_counted_once(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    # A gateway batch whose reply was lost is sent again (or replayed from the spool) with the same number.
    minute = contract.minute_of(time.time())
    field = contract.Dimension("api_users", "con_bob", "key_bob", 200).field()
    batch = Batch("worker-a", 7, "acme", {(minute, field): [3, 0, 30, 300, 3000, 1000, 0]})
    apply = redis_client.register_script(SCRIPT)
    keys, args = _script_args(batch)
    redis_client.sadd(contract.TENANTS_KEY, "acme")

    assert apply(keys=keys, args=args) == 1
    assert apply(keys=keys, args=args) == 0, "the same batch again changes nothing"
    older = Batch("worker-a", 6, "acme", batch.buckets)
    assert apply(keys=_script_args(older)[0], args=_script_args(older)[1]) == 0, "nor does an older one"
    newer = Batch("worker-a", 8, "acme", batch.buckets)
    assert apply(keys=_script_args(newer)[0], args=_script_args(newer)[1]) == 1

    flusher.drain()
    assert stored_total() == 6


def test_a_failed_transaction_leaves_the_claim_for_a_later_round(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    events = mixed_events(64, ts=time.time() - 120)
    emit(redis_client, events)

    def fail() -> None:
        raise RuntimeError("database went away")

    flusher.before_commit = fail
    flusher.lease = timedelta(seconds=0.2)
    with pytest.raises(RuntimeError):
        flusher.drain()
    assert stored_total() == 0
    assert waiting_minutes(redis_client) == 1, "the claimed minute stays in Redis until it is stored"

    flusher.before_commit = None
    time.sleep(0.3)  # the dead claim's lease is over
    flusher.drain()
    assert stored_counts() == emitted_counts(events)
    assert waiting_minutes(redis_client) == 0


def test_a_claim_of_a_live_flusher_is_left_alone_until_its_lease_ends(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    emit(redis_client, mixed_events(30, ts=time.time() - 120))
    other = UsageFlusher(client=flusher_redis(settings.REDIS_URL), consumer="other", lease=timedelta(seconds=0.3))
    claims = other._claim("acme", closed_only=True)  # took the minute, then stopped before copying it
    assert len(claims) == 1

    assert flusher.drain().minutes == 0, "another flusher's claim is not taken while its lease runs"
    time.sleep(0.4)
    assert flusher.drain().requests == 30
    assert stored_total() == 30


def test_a_minute_committed_but_not_released_is_not_copied_twice(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    events = mixed_events(40, ts=time.time() - 120)
    emit(redis_client, events)

    def die() -> None:
        raise SystemExit("killed between commit and release")

    flusher.after_commit = die
    flusher.lease = timedelta(seconds=0.2)
    with pytest.raises(SystemExit):
        flusher.drain()
    assert stored_total() == 40 and waiting_minutes(redis_client) == 1

    flusher.after_commit = None
    time.sleep(0.3)
    stats = flusher.drain()

    assert (stats.requests, stats.skipped) == (0, 1)
    assert stored_counts() == emitted_counts(events)
    assert waiting_minutes(redis_client) == 0 and _usage_keys(redis_client) == []


def test_following_copies_only_minutes_that_are_over(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    now = time.time()
    emit(redis_client, [make_event(ts=now - 180), make_event(ts=now)])

    assert flusher.flush_once().requests == 1, "the minute in progress waits until it is over"
    assert flusher.drain().requests == 1, "a one-off drain takes it too"
    assert stored_total() == 2


def test_malformed_buckets_and_unknown_tenants_are_dropped_without_blocking_the_others(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    good = mixed_events(5)
    emit(redis_client, good)
    minute = contract.minute_of(time.time())
    redis_client.hset(contract.minute_key("acme", minute), "not-a-dimension", "1,0,0,0,0,0,0")
    redis_client.hset(contract.minute_key("acme", minute), "api_x\tc\tk\t200", "1,2")
    emit(redis_client, [make_event(tenant="deleted-tenant")] * 3)

    stats = flusher.drain()

    assert (stats.requests, stats.dropped) == (5, 3)
    assert stored_counts() == emitted_counts(good)
    assert waiting_minutes(redis_client) == 0


def test_copy_tokens_are_forgotten_after_two_days(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    emit(redis_client, mixed_events(3))
    flusher.drain()
    assert UsageCopy.objects.count() == 1, "one token per copied tenant-minute, not per request"
    UsageCopy.objects.create(
        token="0:old",
        tenant_id="acme",
        minute=datetime(2020, 1, 1, tzinfo=UTC),
        copied_at=datetime(2020, 1, 1, tzinfo=UTC),
    )

    assert flusher.forget_copy_tokens() == 1
    assert UsageCopy.objects.count() == 1


def test_last_used_at_follows_traffic_at_most_once_a_minute(
    flusher: UsageFlusher, redis_client: redis.Redis, bob_key: tuple[ApiKey, str]
) -> None:
    key, _ = bob_key
    t0 = contract.minute_of(time.time() - 600) + 10
    emit(redis_client, [make_event(key=key.key_id, ts=t0)])
    flusher.drain()
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(contract.minute_of(t0), tz=UTC)

    with CaptureQueriesContext(connection) as queries:
        emit(redis_client, [make_event(key=key.key_id, ts=t0 + 30)])
        flusher.drain()
    assert not [q for q in queries if "am_api_keys" in q["sql"]], "a second use within the minute writes nothing"

    emit(redis_client, [make_event(key=key.key_id, ts=t0 + 90)])
    flusher.drain()
    key.refresh_from_db()
    assert key.last_used_at == datetime.fromtimestamp(contract.minute_of(t0 + 90), tz=UTC)


def test_flush_usage_command_reports_what_it_counted(
    redis_client: redis.Redis, acme: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    emit(redis_client, mixed_events(12))

    call_command("flush_usage")

    assert "counted 12 requests" in capsys.readouterr().out
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


# -- rollups, time zones, partitions -------------------------------------------------------------------------------


def test_rollups_equal_the_sum_of_their_minutes(flusher: UsageFlusher, redis_client: redis.Redis, acme: Tenant) -> None:
    acme.timezone = "Asia/Kolkata"  # +05:30: local days do not start on a UTC hour
    acme.save()
    start = contract.minute_of(time.time()) - 3 * 86400
    events = []
    for i in range(400):  # every ~17 minutes over three days, a few dimensions
        events += mixed_events(1 + i % 3, ts=start + i * 613)
    for i in range(0, len(events), 97):
        emit(redis_client, events[i : i + 97])
        flusher.drain()  # copied in many rounds: each hour and day row is built by additions

    for model, width in ((UsageHourly, timedelta(hours=1)), (UsageDaily, timedelta(days=1))):
        for row in model.objects.all():
            minutes = UsageRecord.objects.filter(
                tenant_id=row.tenant_id,
                api_id=row.api_id,
                consumer_id=row.consumer_id,
                key_id=row.key_id,
                status_code=row.status_code,
                timestamp__gte=row.timestamp,
                timestamp__lt=row.timestamp + width,
            ).aggregate(n=Sum("request_count"), b=Sum("bytes_out"), lat=Sum("latency_ms_sum"))
            assert (row.request_count, row.bytes_out) == (minutes["n"], minutes["b"]), (model, row.timestamp)
            assert row.latency_ms_sum == pytest.approx(minutes["lat"])
        total = model.objects.aggregate(n=Sum("request_count"))["n"]
        assert total == len(events) == stored_total()
    for model, per_key in ((UsageHourlyTotal, UsageHourly), (UsageDailyTotal, UsageDaily)):
        for dimension, field in (("tenant", None), ("api", "api_id"), ("consumer", "consumer_id")):
            for total in model.objects.filter(dimension=dimension):
                rows = per_key.objects.filter(timestamp=total.timestamp, status_code=total.status_code)
                if field:
                    rows = rows.filter(**{field: total.value})
                summed = rows.aggregate(n=Sum("request_count"), m=Max("latency_ms_max"))
                assert (total.request_count, total.latency_ms_max) == (summed["n"], summed["m"]), (dimension, total)
    for day in UsageDaily.objects.all():
        local = day.timestamp.astimezone(ZoneInfo("Asia/Kolkata"))
        assert (local.hour, local.minute) == (0, 0), "daily rows start at the tenant's local midnight"


def test_a_request_at_the_last_tenth_of_a_local_day_counts_for_that_day(
    flusher: UsageFlusher, redis_client: redis.Redis, acme: Tenant
) -> None:
    zone = ZoneInfo("America/New_York")
    acme.timezone = "America/New_York"
    acme.save()
    late = datetime(2026, 3, 7, 23, 59, 59, 900000, tzinfo=zone)  # UTC: already 04:59:59.9 on the 8th
    emit(redis_client, [make_event(ts=late.timestamp()), make_event(ts=late.timestamp() + 0.2)])

    flusher.drain()

    days = {row.timestamp.astimezone(zone).date(): row.request_count for row in UsageDaily.objects.all()}
    assert days == {late.date(): 1, (late + timedelta(days=1)).date(): 1}


def test_a_minute_on_the_last_day_of_a_month_lands_in_that_months_partition(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    last = datetime(2027, 1, 31, 23, 59, 30, tzinfo=UTC)
    emit(redis_client, [make_event(ts=last.timestamp()), make_event(ts=last.timestamp() + 45)])

    flusher.drain()

    with connection.cursor() as cursor:
        cursor.execute(
            'SELECT tableoid::regclass::text, "timestamp", request_count FROM am_usage_records ORDER BY "timestamp"'
        )
        rows = cursor.fetchall()
    assert rows == [
        ("am_usage_records_p202701", datetime(2027, 1, 31, 23, 59, tzinfo=UTC), 1),
        ("am_usage_records_p202702", datetime(2027, 2, 1, 0, 0, tzinfo=UTC), 1),
    ]
    assert {p for _t, p, _m in usage_partitions.partitions()} >= {
        f"{table}_p{month}" for table in usage_partitions.PARTITIONED_TABLES for month in ("202701", "202702")
    }


@pytest.mark.django_db(transaction=True)
def test_retention_drops_whole_months_and_nothing_else(flusher: UsageFlusher, redis_client: redis.Redis) -> None:
    old, kept = datetime(2024, 5, 31, 23, 59, tzinfo=UTC), datetime(2024, 6, 1, 0, 0, tzinfo=UTC)
    emit(redis_client, [make_event(ts=old.timestamp()), make_event(ts=kept.timestamp()), make_event()])
    flusher.drain()
    assert stored_total() == 3

    dropped = usage_partitions.drop_before(datetime(2024, 6, 15, tzinfo=UTC))

    assert set(dropped) == {f"{table}_p202405" for table in usage_partitions.PARTITIONED_TABLES}
    assert len(dropped) == 5, "minutes, hours, days and both totals tables"
    assert sorted(r.timestamp for r in UsageRecord.objects.all())[0] == kept, "June 2024 is only half past"
    assert stored_total() == 2
    assert UsageHourly.objects.aggregate(n=Sum("request_count"))["n"] == 2
    assert Tenant.objects.filter(id="acme").exists()
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('am_usage_records'), to_regclass('am_usage_records_p202406')")
        assert all(cursor.fetchone()), "the parent table and younger months stay"


@pytest.mark.django_db(transaction=True)
def test_flush_usage_drops_partitions_beyond_usage_retention_days(
    redis_client: redis.Redis, acme: Tenant, settings: object, capsys: pytest.CaptureFixture[str]
) -> None:
    emit(redis_client, [make_event(ts=datetime(2023, 2, 10, tzinfo=UTC).timestamp()), make_event()])
    call_command("flush_usage")
    assert stored_total() == 2
    settings.USAGE_RETENTION_DAYS = 400  # type: ignore[attr-defined]

    call_command("flush_usage")

    assert "am_usage_records_p202302" in capsys.readouterr().out
    assert stored_total() == 1


# -- upgrading from the per-request stream ----------------------------------------------------------------------------


def _previous_release_event(i: int, ts: float) -> dict[str, str]:
    """An entry as gateways of the previous release appended it to usage:events."""
    return {
        "rid": f"rid-{i}",
        "ts": f"{ts:.3f}",
        "tenant": "acme",
        "api": ("api_users", "api_orders")[i % 2],
        "consumer": "con_bob",
        "key": "key_bob",
        "method": "GET",
        "status": ("200", "502")[i % 5 == 0],
        "bytes_in": "10",
        "bytes_out": "100",
        "latency_ms": "12.500",
        "upstream_ms": "5.000",
    }


def test_events_of_the_previous_release_are_counted_once_during_a_rolling_upgrade(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    now = time.time()
    for i in range(30):
        redis_client.xadd("usage:events", _previous_release_event(i, now - 120))
    redis_client.xadd("usage:events", {"ts": "not-a-number", "tenant": "acme", "status": "200"})
    emit(redis_client, mixed_events(12))  # new gateways meanwhile

    def die() -> None:
        raise SystemExit("killed between commit and trim")

    flusher.after_commit = die
    with pytest.raises(SystemExit):
        flusher.drain_legacy_stream()
    assert stored_total() == 30 and redis_client.xlen("usage:events") == 31
    flusher.after_commit = None

    stats = flusher.drain()

    assert stats.skipped == 1, "the batch committed before the crash is recognised"
    assert stored_total() == 42
    assert redis_client.exists("usage:events") == 0
    fives = UsageRecord.objects.filter(status_code=502).aggregate(n=Sum("request_count"), e=Sum("error_count"))
    assert fives == {"n": 6 + 2, "e": 6 + 2}, "six old events and two new requests answered 502"
    assert UsageHourlyTotal.objects.filter(dimension="tenant").aggregate(n=Sum("request_count"))["n"] == 42
