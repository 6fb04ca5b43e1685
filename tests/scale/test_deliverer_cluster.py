"""The event deliverer on a real Redis Cluster: its quota.threshold scan reads the counters of many tenants, whose
keys live in different hash slots, so it must never send one MGET across them (redis-py refuses such a call with
RedisClusterException before it reaches a node).

The cluster is started by the test from the redis-server binary (tests/support/redis_topologies.py) and killed
afterwards. Marked ``redis_topology`` like the other tests here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from redis.crc import key_slot

from apimgmt import limits, services
from apimgmt.models import Event, Plan, Tenant
from apimgmt.redis_client import reset_redis
from tests.support.quotas import quota_window, subscribed_on_quota
from tests.support.redis_topologies import LocalCluster, redis_cluster

pytestmark = [pytest.mark.redis_topology, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def _cluster() -> Iterator[LocalCluster]:
    with redis_cluster() as started:
        yield started


@pytest.fixture
def cluster(_cluster: LocalCluster, settings: Any) -> Iterator[LocalCluster]:
    """The module's cluster, emptied, and this process's REDIS_URL pointing at it."""
    _cluster.wait_healthy()
    _cluster.flush()
    settings.REDIS_URL = _cluster.url
    reset_redis()
    yield _cluster
    reset_redis()


def _quota_at_80_percent(tenant: Tenant, cluster: LocalCluster) -> str:
    """A subscription of a new consumer of ``tenant`` on a 10-a-day quota, its counter at 8; returns the key."""
    consumer = services.consumer_create(tenant=tenant, name=f"{tenant.pk}-app", actor=None)
    quota, _ = subscribed_on_quota(tenant, consumer, {"requests_per_day": 10}, base_path=f"/{tenant.pk}/orders")
    window = quota_window(quota, consumer.pk, timezone.now().timestamp())
    cluster.client().set(window.key, 8, ex=3600)
    return window.key


@pytest.mark.django_db(transaction=True)
def test_one_round_announces_each_tenants_threshold_once_across_hash_slots(
    acme: Tenant, globex: Tenant, cluster: LocalCluster
) -> None:
    keys = [_quota_at_80_percent(acme, cluster), _quota_at_80_percent(globex, cluster)]
    assert len({key_slot(k.encode()) for k in keys}) == 2  # the tenants' counters are in different slots

    call_command("deliver_events")  # one round, as the deliverer's --follow runs them
    call_command("deliver_events")  # a second round finds nothing new

    notices = Event.objects.filter(event_type="quota.threshold")
    assert sorted(str(k) for k in notices.values_list("dedupe_key", flat=True)) == sorted(
        f"quota.threshold:{k}:80" for k in keys
    )
    assert sorted(notices.values_list("tenant_id", flat=True)) == ["acme", "globex"]


def _day_counter(tenant: Tenant, plan: Plan, consumer_id: str) -> str:
    policy = plan.policies.get()
    (window,) = limits.counter_windows(
        tenant_id=tenant.pk,
        tz_name=tenant.timezone,
        policy_id=policy.pk,
        policy_name=policy.name,
        policy_type="quota",
        config=policy.config,
        scope=consumer_id,
        now=timezone.now().timestamp(),
    )
    return window.key


def _change_plan_with_lagging_traffic(tenant: Tenant, cluster: LocalCluster, capture: Any) -> str:
    """A new consumer of ``tenant`` with 3 requests on "small" moves to "big" (carried at commit), then a gateway still
    on small counts 2 more; returns the key of big's counter, which the second pass must bring to 5."""
    small, big = (
        services.plan_create(
            tenant=tenant,
            name=name,
            policies=[
                services.policy_create(
                    tenant=tenant, name=name, policy_type="quota", config={"requests_per_day": limit}, actor=None
                )
            ],
            actor=None,
        )
        for name, limit in (("small", 5), ("big", 8))
    )
    api = services.api_create(
        tenant=tenant,
        api_name="orders",
        base_path=f"/{tenant.pk}/orders",
        upstream_url="https://93.184.215.14",
        status="active",
        plans=[small, big],
        actor=None,
    )
    consumer = services.consumer_create(tenant=tenant, name=f"{tenant.pk}-app", actor=None)
    subscription = services.subscription_request(consumer=consumer, api=api, plan=small, actor=None)
    client = cluster.client()
    client.set(_day_counter(tenant, small, consumer.pk), 3, ex=90000)
    with capture(execute=True):
        services.subscription_change_plan(subscription=subscription, plan=big, actor=None)
    assert int(client.get(_day_counter(tenant, big, consumer.pk)) or 0) == 3
    client.incrby(_day_counter(tenant, small, consumer.pk), 2)  # a gateway still on small
    return _day_counter(tenant, big, consumer.pk)


def test_plan_changes_of_two_tenants_carry_quota_over_twice_each_in_its_tenants_slot(
    acme: Tenant,
    globex: Tenant,
    cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    # The second pass looks up both changes' done markers (MGET per tenant: different slots) and runs each change's
    # script in its tenant's slot.
    keys = [_change_plan_with_lagging_traffic(t, cluster, django_capture_on_commit_callbacks) for t in (acme, globex)]
    assert len({key_slot(k.encode()) for k in keys}) == 2
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")
    call_command("deliver_events")
    assert [int(cluster.client().get(k) or 0) for k in keys] == [5, 5]
