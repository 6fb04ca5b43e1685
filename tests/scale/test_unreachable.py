"""A Redis Cluster none of whose seed nodes answers (a gateway started during an outage): requests are decided by
each policy's on_store_error and keys come from the database, never a 500 (building the cluster client is tried
again every CLUSTER_RETRY_SECONDS)."""

from __future__ import annotations

from typing import Any

import pytest

from apimgmt import redis_client, services
from apimgmt.models import ApiKey, Consumer, Tenant
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Recorder
from tests.support.redis_topologies import free_ports

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(("on_store_error", "status"), [("open", 200), ("closed", 503)])
def test_an_unreachable_cluster_means_on_store_error_not_a_500(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    upstream: Recorder,
    settings: Any,
    on_store_error: str,
    status: int,
) -> None:
    _, key = bob_key
    policy = services.policy_create(
        tenant=acme,
        name="p",
        policy_type="rate_limiting",
        config={"requests_per_minute": 100},
        on_store_error=on_store_error,
        actor=None,
    )
    api = publish(acme, upstream.url, policies=[policy])
    subscribe(bob_app, api)
    nobody = free_ports(7000, 7100, 2)
    settings.REDIS_URL = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in nobody)
    redis_client.reset_redis()

    for _ in range(3):
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == status
    assert isinstance(redis_client.get_redis(), redis_client._Unreachable)
