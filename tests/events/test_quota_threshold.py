"""quota.threshold: read from the gateway's own counters by the deliverer (the request path is untouched), each
threshold once per window and counter however many requests cross it at once and however many deliverers scan."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from django.db import connection
from django.utils import timezone

from apimgmt import events, limits, services, webhooks
from apimgmt.models import Event
from apimgmt.redis_client import get_redis
from gateway.wsgi import reset_gateway
from tests.gateway.conftest import InProcessGateway, publish
from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.quotas import quota_window, subscribed_on_quota

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "events" / "quota.threshold.schema.json").read_text()
)


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@pytest.fixture
def gateway(settings: Any, tmp_path: Any) -> Iterator[InProcessGateway]:
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    gw = InProcessGateway()
    yield gw
    reset_gateway()


def _in_thread(work: Any) -> None:
    """Run ``work`` as another thread would, closing the thread's own database connection after it."""
    try:
        work()
    finally:
        connection.close()


def _scan_from_two_deliverers() -> None:
    scans = [
        threading.Thread(target=_in_thread, args=(lambda: events.quota_threshold_notices(client=get_redis()),))
        for _ in range(2)
    ]
    for t in scans:
        t.start()
    for t in scans:
        t.join()


@pytest.mark.django_db(transaction=True)
def test_sixteen_threads_crossing_80_percent_give_one_notice_per_threshold_and_window(
    acme, alice, bob_app, bob_key, upstream, gateway, redis_client, receiver
):
    quota = services.policy_create(
        tenant=acme, name="hundred", policy_type="quota", config={"requests_per_day": 100}, actor=alice
    )
    plan = services.plan_create(tenant=acme, name="hundred", policies=[quota], actor=alice)
    api = publish(acme, upstream.url, plans=[plan])
    subscription = services.subscription_request(consumer=bob_app, api=api, plan=plan, actor=alice)
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice, event_types=["quota.threshold"])
    _key, plaintext = bob_key
    assert gateway.get("/api/users/v1/x", headers={"X-API-Key": plaintext}).status == 200
    _scan_from_two_deliverers()
    assert not Event.objects.filter(event_type="quota.threshold").exists()  # 1 of 100

    def burst(n: int) -> None:
        def requests() -> None:
            for _ in range(n):
                gateway.get("/api/users/v1/x", headers={"X-API-Key": plaintext})

        _in_thread(requests)

    threads = [threading.Thread(target=burst, args=(5,)) for _ in range(16)]  # 80 more: 81 of 100
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _scan_from_two_deliverers()
    _scan_from_two_deliverers()
    rows = list(Event.objects.filter(event_type="quota.threshold"))
    assert [r.data["threshold"] for r in rows] == [80]
    assert rows[0].data["used"] == 81 and rows[0].data["limit"] == 100
    assert rows[0].data["subscription_id"] == subscription.pk and rows[0].data["window"] == "day"
    threads = [threading.Thread(target=burst, args=(2,)) for _ in range(16)]  # 32 more: 100 admitted, the rest 429
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _scan_from_two_deliverers()
    _scan_from_two_deliverers()
    assert sorted(Event.objects.filter(event_type="quota.threshold").values_list("data__threshold", flat=True)) == [
        80,
        100,
    ]
    deliverer = webhooks.Deliverer()
    deliverer.run_once()
    deliverer.close()
    assert sorted(r.payload["data"]["threshold"] for r in receiver.received) == [80, 100]  # sent in parallel
    for got in receiver.received:
        jsonschema.validate(got.payload, SCHEMA, format_checker=jsonschema.FormatChecker())


def test_counters_shared_by_an_api_or_a_tenant_are_nobodys_quota(acme, alice, bob_app, redis_client):
    shared = services.policy_create(
        tenant=acme,
        name="shared",
        policy_type="quota",
        config={"requests_per_day": 10, "key_extraction": "api"},
        actor=alice,
    )
    plan = services.plan_create(tenant=acme, name="shared", policies=[shared], actor=alice)
    api = services.api_create(
        tenant=acme,
        api_name="orders",
        base_path="/orders",
        upstream_url="https://93.184.215.14",
        status="active",
        plans=[plan],
        actor=alice,
    )
    services.subscription_request(consumer=bob_app, api=api, plan=plan, actor=alice)
    for key in redis_client.scan_iter("rate_limit:*"):
        redis_client.delete(key)
    (window,) = limits.counter_windows(
        tenant_id="acme",
        tz_name="UTC",
        policy_id=shared.pk,
        policy_name="shared",
        policy_type="quota",
        config=shared.config,
        scope=api.pk,
        now=timezone.now().timestamp(),
    )
    redis_client.set(window.key, 10)
    assert events.quota_threshold_notices(client=redis_client) == 0


def test_a_crossing_in_the_last_seconds_of_a_window_is_announced_after_it_ended(acme, alice, bob_app, redis_client):
    quota, _ = subscribed_on_quota(acme, bob_app, {"requests_per_day": 10}, actor=alice)
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)

    def window_at(moment: datetime) -> limits.CounterWindow:
        return quota_window(quota, bob_app.pk, moment.timestamp())

    yesterday = window_at(midnight - timedelta(seconds=1))
    # The scan at 23:59:55 saw 7 of 10; the eighth request came at 23:59:58, and the next scan runs after midnight.
    redis_client.set(yesterday.key, 7, ex=3600)
    assert events.quota_threshold_notices(client=redis_client, now=midnight - timedelta(seconds=5)) == 0
    redis_client.set(yesterday.key, 8, ex=3600)
    assert events.quota_threshold_notices(client=redis_client, now=midnight + timedelta(seconds=5)) == 1
    assert events.quota_threshold_notices(client=redis_client, now=midnight + timedelta(seconds=15)) == 0  # once
    notice = Event.objects.get(event_type="quota.threshold")
    assert notice.dedupe_key == f"quota.threshold:{yesterday.key}:80"
    assert notice.data["window_end"] == midnight.isoformat().replace("+00:00", "Z")
    assert notice.data["used"] == 8 and notice.data["threshold"] == 80
    # Today's window is read as before, and yesterday's is left alone once the grace is over.
    redis_client.set(window_at(midnight).key, 10, ex=3600)
    redis_client.set(yesterday.key, 10, ex=3600)
    assert events.quota_threshold_notices(client=redis_client, now=midnight + timedelta(minutes=5)) == 2
    assert Event.objects.filter(dedupe_key__startswith=f"quota.threshold:{yesterday.key}:").count() == 1
