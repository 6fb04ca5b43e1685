"""WebSocket connections in the usage tables: connections, seconds open, messages and bytes each way, each once."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db.models import Sum

from apimgmt import services
from apimgmt import usage_buckets as contract
from apimgmt.models import Tenant, UsageDaily, UsageDailyTotal, UsageHourly, UsageHourlyTotal, UsageRecord
from apimgmt.usage import UsageFlusher, flusher_redis
from gateway.usage import SCRIPT, Batch, _script_args
from tests.gateway.conftest import publish, subscribe
from tests.gateway.test_websocket import WsUpstream, _connect, _wait_routable
from tests.support.servers import gunicorn
from tests.usage.helpers import recorder, wait_until, waiting_minutes

COUNTED = ("request_count", "connection_count", "messages_in", "messages_out", "bytes_in", "bytes_out")


def _stored(model: Any, **where: Any) -> dict[str, Any]:
    return model.objects.filter(**where).aggregate(
        **{name: Sum(name) for name in COUNTED}, connection_seconds=Sum("connection_seconds")
    )


def _in_redis(client: redis.Redis, tenant: str, field: str) -> list[int]:
    """The bucket ``field`` summed over the tenant's minutes waiting in Redis."""
    totals = contract.empty()
    for name in client.scan_iter(f"{contract.tag(tenant)}:m:*"):
        value = client.hget(name, field)
        if value is not None:
            contract.merge(totals, contract.decode(value.decode()))
    return totals


@pytest.fixture
def flusher(redis_client: redis.Redis, acme: Tenant) -> UsageFlusher:
    return UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer="ws-usage")


def test_connections_messages_and_bytes_through_the_gateway_are_stored_exactly_once(
    live_env: dict[str, str], tmp_path: Path, acme, bob_app, redis_client, flusher, settings
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    upstream = WsUpstream()
    env = {
        **live_env,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    try:
        api = publish(acme, upstream.url + "/svc", websocket=True)
        subscribe(bob_app, api)
        _, key = services.api_key_create(consumer=bob_app, actor=None)
        measured_row, measured = services.api_key_create(consumer=bob_app, actor=None)  # its own: exact counts
        with gunicorn(env, workers=2, log_path=tmp_path / "gunicorn.log") as http_url:
            url = http_url.replace("http://", "ws://") + "/api/users/v1/echo"
            _wait_routable(url, key)
            messages = ["x" * 10, "é" * 10, b"\x00" * 100, b"\x01" * 70_000]  # 10 + 20 + 100 + 70,000 bytes
            started = time.monotonic()
            for _ in range(3):  # three connections (fresh ones: both workers), four messages each way on each
                with _connect(url, measured) as ws:
                    for message in messages:
                        ws.send(message)
                        assert ws.recv(timeout=5) == message
            with _connect(url, measured) as ws:  # and one message in two fragments: one message, its bytes
                ws.send(["frag", "ments"])
                assert ws.recv(timeout=5) == "fragments"
            elapsed = time.monotonic() - started
            field = contract.Dimension(api.pk, bob_app.pk, measured_row.pk, 101).field()
            # Each worker sends its buckets about once a second (and what is left when it stops, below).
            assert wait_until(lambda: _in_redis(redis_client, acme.id, field)[contract.MESSAGES_IN] == 13, 10)
    finally:
        upstream.stop()
    flusher.drain()

    size = 3 * (10 + 20 + 100 + 70_000) + 9
    expected = {
        "request_count": 4,  # each handshake is one request
        "connection_count": 4,
        "messages_in": 13,
        "messages_out": 13,
        "bytes_in": size,
        "bytes_out": size,
    }
    minutes = _stored(UsageRecord, key_id=measured_row.pk, status_code=101)
    assert {name: minutes[name] for name in COUNTED} == expected
    assert 0 < minutes["connection_seconds"] < elapsed + 1
    for rollup in (UsageHourly, UsageDaily):
        assert _stored(rollup, key_id=measured_row.pk, status_code=101) == pytest.approx(minutes)
    # The tenant-wide totals hold the same numbers as the rows they sum (both keys' connections).
    for rollup, totals in ((UsageHourly, UsageHourlyTotal), (UsageDaily, UsageDailyTotal)):
        every_key = _stored(rollup, api_id=api.pk, status_code=101)
        assert _stored(totals, dimension="api", value=api.pk, status_code=101) == pytest.approx(every_key)
        assert every_key["connection_count"] > 4
    assert waiting_minutes(redis_client) == 0

    flusher.drain()  # again: nothing more
    assert _stored(UsageRecord, key_id=measured_row.pk, status_code=101) == minutes


def _connection_batch(number: int, minute: int, field: str) -> Batch:
    values = contract.empty()
    values[2], values[3] = 3000, 5000  # message bytes in, out
    values[contract.CONNECTION_COUNT] = 2
    values[contract.CONNECTION_US] = 90_500_000  # 90.5 s
    values[contract.MESSAGES_IN], values[contract.MESSAGES_OUT] = 30, 50
    return Batch("worker-ws", number, "acme", {(minute, field): values})


def test_a_connection_batch_replayed_by_the_gateway_or_a_restarted_flusher_is_not_counted_twice(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    minute = contract.minute_of(time.time() - 120)
    field = contract.Dimension("api_chat", "con_bob", "key_bob", 101).field()
    apply = redis_client.register_script(SCRIPT)
    redis_client.sadd(contract.TENANTS_KEY, "acme")
    batch = _connection_batch(1, minute, field)
    assert apply(*_keys_args(batch)) == 1
    assert apply(*_keys_args(batch)) == 0, "the same batch from the spool again changes nothing"

    def die() -> None:
        raise SystemExit("killed between commit and release")

    flusher.after_commit = die
    flusher.lease = timedelta(seconds=0.2)
    with pytest.raises(SystemExit):
        flusher.drain()
    flusher.after_commit = None
    time.sleep(0.3)  # its claim's lease ends; a restarted flusher takes the claim over and finds it copied
    assert flusher.drain().skipped == 1

    (row,) = UsageRecord.objects.filter(api_id="api_chat")
    assert (row.connection_count, row.messages_in, row.messages_out, row.bytes_in, row.bytes_out) == (
        2,
        30,
        50,
        3000,
        5000,
    )
    assert row.connection_seconds == pytest.approx(90.5)
    assert row.request_count == 0  # the handshakes are counted as requests when they happen, not here


def _keys_args(batch: Batch) -> tuple[list[str], list[Any]]:
    keys, args = _script_args(batch)
    return keys, args


def test_request_and_connection_numbers_add_up_in_one_bucket_in_either_order(
    flusher: UsageFlusher, redis_client: redis.Redis
) -> None:
    # A request-only bucket is the seven numbers of the previous release; one with connection numbers has all.
    minute = contract.minute_of(time.time() - 120)
    field = contract.Dimension("api_chat", "con_bob", "key_bob", 101).field()
    apply = redis_client.register_script(SCRIPT)
    redis_client.sadd(contract.TENANTS_KEY, "acme")
    handshake = Batch("worker-a", 1, "acme", {(minute, field): [1, 0, 0, 0, 2000, 2000, 1500]})
    assert contract.encode(handshake.buckets[(minute, field)]) == "1,0,0,0,2000,2000,1500"
    apply(*_keys_args(handshake))
    apply(*_keys_args(_connection_batch(1, minute, field)))
    apply(*_keys_args(Batch("worker-b", 1, "acme", {(minute, field): [1, 0, 0, 0, 3000, 3000, 1000]})))
    stored = contract.decode(redis_client.hget(contract.minute_key("acme", minute), field).decode())
    assert stored == [2, 0, 3000, 5000, 5000, 3000, 2500, 2, 90_500_000, 30, 50]

    flusher.drain()
    (row,) = UsageRecord.objects.filter(api_id="api_chat")
    assert (row.request_count, row.latency_ms_max, row.connection_count, row.messages_in) == (2, 3.0, 2, 30)


def test_a_gateway_worker_sums_connection_shares_into_one_bucket_per_minute(redis_client: redis.Redis) -> None:
    worker = recorder()
    now = time.time()
    worker.record("acme", "api_chat", "con_bob", "key_bob", 101, 0, 0, 0.002, 0.001, now)
    for opened in (1, 0, 0):  # a connection's share when it opens, then two more seconds
        worker.add_connection(
            "acme",
            "api_chat",
            "con_bob",
            "key_bob",
            101,
            now,
            opened=opened,
            open_us=1_000_000,
            messages_in=2,
            messages_out=3,
            bytes_in=20,
            bytes_out=30,
        )
    worker.flush(redis_client)
    field = contract.Dimension("api_chat", "con_bob", "key_bob", 101).field()
    assert _in_redis(redis_client, "acme", field) == [1, 0, 60, 90, 2000, 2000, 1000, 1, 3_000_000, 6, 9]


def test_bucket_values_of_seven_to_eleven_numbers_are_read_and_others_refused() -> None:
    assert contract.decode("1,0,2,3,4,4,1") == [1, 0, 2, 3, 4, 4, 1, 0, 0, 0, 0]
    assert contract.decode("1,0,2,3,4,4,1,1") == [1, 0, 2, 3, 4, 4, 1, 1, 0, 0, 0]
    assert contract.encode([1, 0, 2, 3, 4, 4, 1, 0, 5, 0, 0]) == "1,0,2,3,4,4,1,0,5"
    for bad in ("1,2", "1,0,2,3,4,4,1,0,0,0,0,0"):
        with pytest.raises(ValueError, match="7 to 11 numbers"):
            contract.decode(bad)


@pytest.mark.django_db
def test_the_management_api_shows_connections_also_in_minutes_without_a_handshake(acme, alice, acme_api) -> None:
    from rest_framework.test import APIClient

    from apimgmt.tokens import api_token_create
    from apimgmt.usage import add_minute

    # A connection opened at 10:01 (its handshake is the request), open until 10:03, with messages each minute.
    row = {"tenant_id": "acme", "api_id": acme_api.pk, "consumer_id": "con_x", "key_id": "key_x", "status_code": 101}
    add_minute(
        **row,
        timestamp="2026-01-01T10:01:00Z",
        request_count=1,
        connection_count=1,
        connection_seconds=30.0,
        messages_in=3,
        messages_out=4,
        bytes_in=30,
        bytes_out=40,
    )
    add_minute(**row, timestamp="2026-01-01T10:02:00Z", connection_seconds=60.0, messages_in=1, bytes_in=10)
    add_minute(**row, timestamp="2026-01-01T10:03:00Z", connection_seconds=12.5)
    _token, plaintext = api_token_create(user=alice, actor=None, name="tests")
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
    window = {"from": "2026-01-01T10:00:00Z", "to": "2026-01-01T11:00:00Z"}

    minutes = c.get("/mgmt/v1/usage/", {"interval": "minute", **window}).json()["results"]
    assert [(m["bucket"][11:16], m["requests"], m["connections"], m["connection_seconds"]) for m in minutes] == [
        ("10:01", 1, 1, 30.0),
        ("10:02", 0, 0, 60.0),
        ("10:03", 0, 0, 12.5),
    ]
    assert minutes[1]["latency_ms_avg"] == 0.0 and minutes[1]["messages_in"] == 1
    (hour,) = c.get("/mgmt/v1/usage/", {"interval": "hour", "tenant_id": "acme", **window}).json()["results"]
    assert (hour["connections"], hour["connection_seconds"], hour["messages_in"], hour["messages_out"]) == (
        1,
        102.5,
        4,
        4,
    )
    assert (hour["bytes_in"], hour["bytes_out"]) == (40, 40)


@pytest.mark.django_db
def test_the_portal_usage_table_shows_an_apps_connections_only_when_it_has_some(acme, bob, bob_app, acme_api) -> None:
    from django.test import Client
    from django.utils import timezone

    from apimgmt.usage import add_minute

    services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    client = Client()
    client.force_login(bob)
    url = f"/portal/acme/apps/{bob_app.pk}/usage/"
    minute = (timezone.now() - timedelta(minutes=5)).replace(second=0, microsecond=0)
    row = {"tenant_id": "acme", "api_id": acme_api.pk, "consumer_id": bob_app.pk, "key_id": "key_x"}
    add_minute(**row, timestamp=minute, status_code=200, request_count=4)
    assert "WebSocket connections" not in client.get(url).content.decode()

    add_minute(
        **row,
        timestamp=minute,
        status_code=101,
        request_count=2,
        connection_count=2,
        connection_seconds=125.4,
        messages_in=7,
        messages_out=8,
    )
    page = client.get(url).content.decode()
    assert "WebSocket connections" in page
    assert '<td class="right">2</td><td class="right">125</td><td class="right">15</td>' in page
