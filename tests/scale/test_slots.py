"""Every Redis call the gateway and the control plane make stays in one cluster slot, by construction.

The check (tests/support/redis_topologies.one_slot_per_call) reads every request redis-py writes in this process
— a script, a pipeline, a MULTI block or one command — asks Redis which of its arguments are keys, and records
each write whose keys hash to more than one slot. It runs the gateway's flows against the suite's standalone
Redis, where a cross-slot call would still work; on a cluster it would be refused (CROSSSLOT) or misrouted.
"""

from __future__ import annotations

import time

import pytest
import redis
from django.conf import settings

from apimgmt import limits, services
from apimgmt.models import ApiKey, Consumer, Tenant
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Recorder
from tests.support.redis_topologies import one_slot_per_call

pytestmark = pytest.mark.django_db(transaction=True)


def _redis_port_and_db() -> tuple[int, int]:
    params = redis.connection.parse_url(settings.REDIS_URL)
    return int(params.get("port", 6379)), int(params.get("db", 0))


def test_the_check_catches_a_call_that_spans_two_slots(redis_client: redis.Redis) -> None:
    port, db = _redis_port_and_db()
    with one_slot_per_call(port, db) as check:
        redis_client.pipeline(transaction=False).get("rate_limit:{acme}:a").get("rate_limit:{acme}:b").execute()
        assert check.violations == []
        redis_client.pipeline(transaction=True).incr("rate_limit:{acme}:a").incr("rate_limit:{globex}:a").execute()
    assert check.violations == [["rate_limit:{acme}:a", "rate_limit:{globex}:a"]]


def test_every_gateway_and_control_plane_call_stays_in_one_slot(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    upstream: Recorder,
    redis_client: redis.Redis,
) -> None:
    row, key = bob_key
    port, db = _redis_port_and_db()
    with one_slot_per_call(port, db) as check:
        # Several windows of two policies (sliding, fixed, quota) and a plan's: one script call per request.
        rate = services.policy_create(
            tenant=acme,
            name="rate",
            policy_type="rate_limiting",
            config={"requests_per_second": 50, "requests_per_minute": 1000, "window_type": "sliding"},
            actor=None,
        )
        fixed = services.policy_create(
            tenant=acme,
            name="fixed",
            policy_type="rate_limiting",
            config={"requests_per_minute": 1000, "window_type": "fixed", "key_extraction": "ip"},
            actor=None,
        )
        quota = services.policy_create(
            tenant=acme, name="quota", policy_type="quota", config={"requests_per_day": 10000}, actor=None
        )
        api = publish(acme, upstream.url, policies=[rate, fixed, quota])
        subscribe(bob_app, api)
        for _ in range(5):  # cold, then warm
            assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200
        gw = get_gateway()
        flush = getattr(gw.usage, "flush", None)
        if flush is not None:
            flush()
        # The portal's quota view reads the same counters in one pipeline.
        windows = limits.counter_windows(
            tenant_id=acme.pk,
            tz_name=acme.timezone,
            policy_id=quota.pk,
            policy_name=quota.name,
            policy_type=quota.policy_type,
            config=quota.config,
            scope=bob_app.pk,
            now=time.time(),
        )
        limits.read_remaining(redis_client, windows)
        # A revocation: tombstone and eviction message; the worker's poller reads them.
        services.api_key_revoke(key=row, actor=None)
        deadline = time.monotonic() + 3
        while gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status != 401:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert check.violations == []
    assert "EVALSHA" in check.commands  # the limiter ran through the check
    assert "XADD" in check.commands and "XREAD" in check.commands  # and so did the invalidation stream
    assert check.multi_key_writes >= 5
