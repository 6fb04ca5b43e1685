"""The gateway's route snapshot, read as plain rows: the same content the gateway routed with before, in a fixed
number of queries whatever the number of APIs (a 10,000-API snapshot is built by every worker on each route
change; make bench-scale measures it)."""

from __future__ import annotations

from typing import Any

import pytest

from apimgmt import selectors, services
from apimgmt.models import Tenant
from apimgmt.selectors import PolicySpec

pytestmark = pytest.mark.django_db


def _policy(tenant: Tenant, name: str) -> Any:
    return services.policy_create(
        tenant=tenant, name=name, policy_type="rate_limiting", config={"requests_per_minute": 10}, actor=None
    )


def test_snapshot_holds_each_routable_api_with_its_targets_and_policies_in_order(
    acme: Tenant, globex: Tenant, django_assert_num_queries: Any
) -> None:
    zulu, alpha = _policy(acme, "zulu"), _policy(acme, "alpha")
    orders = services.api_create(
        tenant=acme,
        api_name="orders",
        base_path="/orders",
        upstream_url="http://10.0.0.1:8080",
        targets=[("http://10.0.0.2:8080", 3), ("http://10.0.0.3:8080", 1)],
        policies=[zulu, alpha],
        status="active",
        actor=None,
    )
    users = services.api_create(
        tenant=acme,
        api_name="users",
        base_path="/users",
        upstream_url="http://10.0.0.4",
        policies=[alpha],
        status="active",
        actor=None,
    )
    services.api_create(tenant=acme, api_name="draft", base_path="/draft", upstream_url="http://10.0.0.5", actor=None)
    services.api_create(
        tenant=globex, api_name="g", base_path="/g", upstream_url="http://10.0.0.6", status="active", actor=None
    )
    services.tenant_suspend(tenant=globex, actor=None)

    with django_assert_num_queries(5):
        snapshot = selectors.route_snapshot()

    assert [r.api_id for r in snapshot.routes] == [orders.pk, users.pk]  # no draft, no suspended tenant
    route = snapshot.routes[0]
    assert route.targets[0] == ("http://10.0.0.1:8080", 1)  # upstream_url first, then the targets (by id)
    assert sorted(route.targets[1:]) == [("http://10.0.0.2:8080", 3), ("http://10.0.0.3:8080", 1)]
    assert [p.name for p in route.policies] == ["alpha", "zulu"]
    assert route.policies[0] == PolicySpec(
        alpha.pk, "alpha", "rate_limiting", alpha.config, alpha.mode, alpha.on_store_error
    )
    assert route.tenant_id == "acme" and route.tenant_timezone == acme.timezone
    assert route.base_path == "/orders" and route.status == "active" and route.sunset_at is None
    assert snapshot.routes[1].policies == [route.policies[0]]


def test_snapshot_queries_do_not_grow_with_the_number_of_apis(acme: Tenant, django_assert_num_queries: Any) -> None:
    policy = _policy(acme, "p")
    for i in range(30):
        services.api_create(
            tenant=acme,
            api_name=f"a{i}",
            base_path=f"/a{i}",
            upstream_url="http://10.0.0.1",
            targets=[("http://10.0.0.2", 1)],
            policies=[policy],
            status="active",
            actor=None,
        )
    with django_assert_num_queries(5):
        snapshot = selectors.route_snapshot()
    assert len(snapshot.routes) == 30
    assert all(len(r.targets) == 2 and r.policies == [snapshot.routes[0].policies[0]] for r in snapshot.routes)
