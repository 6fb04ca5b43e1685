"""CRUD and every action of each management API resource, as staff, tenant admin, developer and viewer."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, Plan, Policy, Subscription, Tenant
from tests.api.conftest import V1

pytestmark = pytest.mark.django_db

RATE = {"requests_per_minute": 1000, "burst_size": 100, "key_extraction": "consumer_id", "window_type": "sliding"}


def api_body(**extra: Any) -> dict[str, Any]:
    return {
        "tenant_id": "acme",
        "api_name": "orders",
        "base_path": "/api/orders/v1",
        "upstream_url": "https://orders.example.com",
        **extra,
    }


# ---------------------------------------------------------------------------
# Tenants
# ---------------------------------------------------------------------------


def test_staff_creates_lists_suspends_and_activates_tenants(staff: User, client_for: Any) -> None:
    c = client_for(staff)
    r = c.post(f"{V1}/tenants/", {"id": "initech", "name": "Initech", "timezone": "Europe/Berlin"}, format="json")
    assert r.status_code == 201, r.json()
    assert r.json()["id"] == "initech" and r.json()["status"] == "active"
    assert [t["id"] for t in c.get(f"{V1}/tenants/").json()["results"]] == ["initech"]
    assert c.post(f"{V1}/tenants/initech/suspend/").json()["status"] == "suspended"
    assert Tenant.objects.get(pk="initech").status == "suspended"
    assert c.post(f"{V1}/tenants/initech/activate/").json()["status"] == "active"
    assert AuditEvent.objects.filter(object_id="initech", action="tenant.suspend", actor=staff).exists()


def test_only_staff_create_or_suspend_tenants(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post(f"{V1}/tenants/", {"id": "mine", "name": "Mine"}, format="json")
    assert r.status_code == 403
    assert c.post(f"{V1}/tenants/acme/suspend/").status_code == 403
    assert not Tenant.objects.filter(pk="mine").exists()


def test_tenant_admin_renames_their_tenant_but_cannot_change_its_id(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    assert c.patch(f"{V1}/tenants/acme/", {"name": "Acme Corp"}, format="json").json()["name"] == "Acme Corp"
    r = c.patch(f"{V1}/tenants/acme/", {"id": "other"}, format="json")
    assert r.status_code == 400 and "id" in r.json()["errors"]


def test_viewer_and_developer_read_their_tenant_but_cannot_change_it(vera: User, bob: User, client_for: Any) -> None:
    for user in (vera, bob):
        c = client_for(user)
        assert c.get(f"{V1}/tenants/acme/").json()["name"] == "Acme"
        assert c.patch(f"{V1}/tenants/acme/", {"name": "x"}, format="json").status_code == 403
    assert Tenant.objects.get(pk="acme").name == "Acme"


# ---------------------------------------------------------------------------
# Policies and plans
# ---------------------------------------------------------------------------


def test_admin_creates_and_updates_a_policy_with_the_guides_config(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post(
        f"{V1}/policies/",
        {"tenant_id": "acme", "name": "std", "policy_type": "rate_limiting", "config": RATE, "mode": "shadow"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    pid = r.json()["id"]
    assert pid.startswith("pol_") and r.json()["config"]["requests_per_minute"] == 1000
    r = c.patch(f"{V1}/policies/{pid}/", {"config": {"requests_per_minute": 5}, "mode": "enforce"}, format="json")
    assert r.status_code == 200 and r.json()["config"]["requests_per_minute"] == 5
    assert Policy.objects.get(pk=pid).mode == "enforce"


def test_bad_policy_config_names_the_config_field(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post(
        f"{V1}/policies/",
        {"tenant_id": "acme", "name": "bad", "policy_type": "rate_limiting", "config": {"requests_per_minute": -1}},
        format="json",
    )
    assert r.status_code == 400
    assert "requests_per_minute" in r.json()["errors"]["config"][0]
    r = c.post(
        f"{V1}/policies/",
        {"tenant_id": "acme", "name": "bad", "policy_type": "quota", "config": {"burst_size": 1}},
        format="json",
    )
    assert r.status_code == 400 and "config" in r.json()["errors"]


def test_admin_creates_a_plan_with_policies_and_changes_them(alice: User, acme_policy: Policy, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post(
        f"{V1}/plans/",
        {"tenant_id": "acme", "name": "free", "policies": [acme_policy.pk], "approval": "manual"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    plan_id = r.json()["id"]
    assert plan_id.startswith("pln_") and r.json()["policies"] == [acme_policy.pk]
    r = c.patch(f"{V1}/plans/{plan_id}/", {"policies": []}, format="json")
    assert r.json()["policies"] == []
    assert Plan.objects.get(pk=plan_id).policies.count() == 0


def test_developer_and_viewer_read_the_catalog_but_cannot_write_it(
    bob: User, vera: User, acme_plan: Plan, acme_policy: Policy, acme_api: Api, client_for: Any
) -> None:
    for user in (bob, vera):
        c = client_for(user)
        assert c.get(f"{V1}/plans/{acme_plan.pk}/").status_code == 200
        assert c.get(f"{V1}/policies/{acme_policy.pk}/").status_code == 200
        assert c.get(f"{V1}/apis/{acme_api.pk}/").status_code == 200
        assert c.patch(f"{V1}/plans/{acme_plan.pk}/", {"name": "x"}, format="json").status_code == 403
        assert c.patch(f"{V1}/policies/{acme_policy.pk}/", {"name": "x"}, format="json").status_code == 403
        assert c.post(f"{V1}/apis/{acme_api.pk}/retire/").status_code == 403
        assert c.post(f"{V1}/apis/", api_body(), format="json").status_code == 403
        assert c.post(f"{V1}/plans/", {"tenant_id": "acme", "name": "p"}, format="json").status_code == 403
    assert Api.objects.get(pk=acme_api.pk).status == "active"
    assert not Api.objects.filter(api_name="orders").exists()


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------


def test_admin_creates_an_api_with_targets_and_policies(alice: User, acme_policy: Policy, client_for: Any) -> None:
    c = client_for(alice)
    r = c.post(
        f"{V1}/apis/",
        api_body(policies=[acme_policy.pk], targets=[{"url": "https://orders-2.example.com", "weight": 3}], retries=2),
        format="json",
    )
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["id"].startswith("api_") and body["status"] == "draft"
    assert body["targets"] == [{"url": "https://orders-2.example.com", "weight": 3}]
    assert body["policies"] == [acme_policy.pk] and body["retries"] == 2


def test_api_lifecycle_through_actions_and_status_updates(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    api_id = c.post(f"{V1}/apis/", api_body(), format="json").json()["id"]
    assert c.post(f"{V1}/apis/{api_id}/activate/").json()["status"] == "active"
    r = c.post(f"{V1}/apis/{api_id}/deprecate/", {"sunset_at": "2031-01-01T00:00:00Z"}, format="json")
    assert r.json()["status"] == "deprecated" and r.json()["sunset_at"] == "2031-01-01T00:00:00Z"
    assert c.patch(f"{V1}/apis/{api_id}/", {"status": "active"}, format="json").json()["status"] == "active"
    r = c.patch(f"{V1}/apis/{api_id}/", {"status": "draft"}, format="json")
    assert r.status_code == 400 and "status" in r.json()["errors"]
    assert c.post(f"{V1}/apis/{api_id}/retire/").json()["status"] == "retired"
    r = c.post(f"{V1}/apis/{api_id}/activate/")
    assert r.status_code == 400 and "status" in r.json()["errors"]
    actions = list(AuditEvent.objects.filter(object_id=api_id).order_by("id").values_list("action", flat=True))
    assert actions == ["api.create", "api.active", "api.deprecated", "api.active", "api.retired"]


def test_api_update_is_atomic_when_the_status_change_fails(alice: User, acme_api: Api, client_for: Any) -> None:
    c = client_for(alice)
    r = c.patch(f"{V1}/apis/{acme_api.pk}/", {"api_name": "renamed", "status": "draft"}, format="json")
    assert r.status_code == 400
    assert Api.objects.get(pk=acme_api.pk).api_name == "users"


def test_put_replaces_an_api_and_keeps_its_tenant(alice: User, acme_api: Api, client_for: Any) -> None:
    c = client_for(alice)
    body = api_body(base_path="/api/users/v2", status="active")
    r = c.put(f"{V1}/apis/{acme_api.pk}/", body, format="json")
    assert r.status_code == 200, r.json()
    assert Api.objects.get(pk=acme_api.pk).base_path == "/api/users/v2"
    r = c.put(f"{V1}/apis/{acme_api.pk}/", {**body, "tenant_id": "globex"}, format="json")
    assert r.status_code == 400 and r.json()["errors"]["tenant_id"] == ["tenant_id cannot be changed after creation."]


def test_api_list_filters_by_status_and_orders(alice: User, acme_api: Api, client_for: Any) -> None:
    c = client_for(alice)
    c.post(f"{V1}/apis/", api_body(api_name="a-draft"), format="json")
    assert [a["api_name"] for a in c.get(f"{V1}/apis/?status=draft").json()["results"]] == ["a-draft"]
    assert [a["api_name"] for a in c.get(f"{V1}/apis/?ordering=-api_name").json()["results"]] == ["users", "a-draft"]
    assert c.get(f"{V1}/apis/?tenant_id=acme").json()["count"] == 2
    assert c.get(f"{V1}/apis/?status=bogus").status_code == 400
    assert c.get(f"{V1}/apis/?ordering=upstream_secret").status_code == 400


def test_lists_paginate_with_count_next_and_previous(alice: User, client_for: Any) -> None:
    c = client_for(alice)
    for i in range(5):
        c.post(f"{V1}/consumers/", {"tenant_id": "acme", "name": f"app-{i}"}, format="json")
    page = c.get(f"{V1}/consumers/?limit=2&offset=2").json()
    assert page["count"] == 5 and [x["name"] for x in page["results"]] == ["app-2", "app-3"]
    assert "offset=4" in page["next"] and "limit=2" in page["previous"]


# ---------------------------------------------------------------------------
# Consumers
# ---------------------------------------------------------------------------


def test_developer_owns_the_consumers_they_create_and_sees_only_those(bob: User, alice: User, client_for: Any) -> None:
    admin_app = client_for(alice).post(f"{V1}/consumers/", {"tenant_id": "acme", "name": "ops"}, format="json").json()
    c = client_for(bob)
    r = c.post(f"{V1}/consumers/", {"tenant_id": "acme", "name": "bob-cli"}, format="json")
    assert r.status_code == 201 and r.json()["owner"] == "bob" and r.json()["id"].startswith("con_")
    assert [x["name"] for x in c.get(f"{V1}/consumers/").json()["results"]] == ["bob-cli"]
    assert c.get(f"{V1}/consumers/{admin_app['id']}/").status_code == 404
    assert c.patch(f"{V1}/consumers/{r.json()['id']}/", {"description": "mine"}, format="json").status_code == 200


def test_only_admins_block_consumers(bob: User, alice: User, bob_app: Consumer, client_for: Any) -> None:
    assert client_for(bob).post(f"{V1}/consumers/{bob_app.pk}/block/").status_code == 403
    assert (
        client_for(bob).patch(f"{V1}/consumers/{bob_app.pk}/", {"status": "blocked"}, format="json").status_code == 403
    )
    c = client_for(alice)
    assert c.post(f"{V1}/consumers/{bob_app.pk}/block/").json()["status"] == "blocked"
    assert c.patch(f"{V1}/consumers/{bob_app.pk}/", {"status": "active"}, format="json").json()["status"] == "active"


def test_developer_deletes_their_consumer_and_its_keys_are_revoked_first(
    bob: User, bob_app: Consumer, bob_key: tuple[ApiKey, str], client_for: Any
) -> None:
    assert client_for(bob).delete(f"{V1}/consumers/{bob_app.pk}/").status_code == 204
    assert not Consumer.objects.filter(pk=bob_app.pk).exists()
    assert AuditEvent.objects.filter(action="api_key.revoke", object_id=bob_key[0].pk).exists()


def test_viewer_cannot_create_or_delete_consumers(vera: User, bob_app: Consumer, client_for: Any) -> None:
    c = client_for(vera)
    assert c.get(f"{V1}/consumers/{bob_app.pk}/").status_code == 200
    assert c.post(f"{V1}/consumers/", {"tenant_id": "acme", "name": "v"}, format="json").status_code == 403
    assert c.delete(f"{V1}/consumers/{bob_app.pk}/").status_code == 403
    assert Consumer.objects.filter(pk=bob_app.pk).exists()


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def test_developer_creates_rotates_and_revokes_keys_of_their_consumer(
    bob: User, bob_app: Consumer, client_for: Any
) -> None:
    c = client_for(bob)
    r = c.post(f"{V1}/keys/", {"consumer_id": bob_app.pk, "name": "ci", "expires_at": None}, format="json")
    assert r.status_code == 201, r.json()
    key_id = r.json()["key_id"]
    r = c.post(f"{V1}/keys/{key_id}/rotate/", {"overlap_seconds": 60}, format="json")
    assert r.status_code == 201
    new = r.json()
    assert new["rotated_from"] == key_id and new["key"].startswith("ak_live_") and new["previous_key_expires_at"]
    r = c.post(f"{V1}/keys/{new['key_id']}/revoke/")
    assert r.status_code == 200 and r.json()["active"] is False and r.json()["revoked_at"]
    assert ApiKey.objects.get(pk=new["key_id"]).revoked_at is not None


def test_developer_cannot_create_keys_for_someone_elses_consumer(bob: User, alice: User, client_for: Any) -> None:
    ops = client_for(alice).post(f"{V1}/consumers/", {"tenant_id": "acme", "name": "ops"}, format="json").json()
    r = client_for(bob).post(f"{V1}/keys/", {"consumer_id": ops["id"]}, format="json")
    assert r.status_code == 400 and "consumer_id" in r.json()["errors"]
    assert not ApiKey.objects.filter(consumer_id=ops["id"]).exists()


def test_admin_revokes_any_key_and_viewer_none(
    alice: User, vera: User, bob_key: tuple[ApiKey, str], client_for: Any
) -> None:
    key = bob_key[0]
    assert client_for(vera).post(f"{V1}/keys/{key.pk}/revoke/").status_code == 403
    assert client_for(vera).get(f"{V1}/keys/{key.pk}/").json()["active"] is True
    assert client_for(alice).post(f"{V1}/keys/{key.pk}/revoke/").json()["active"] is False


def test_rotate_rejects_a_bad_overlap_naming_the_field(bob: User, bob_key: tuple[ApiKey, str], client_for: Any) -> None:
    r = client_for(bob).post(f"{V1}/keys/{bob_key[0].pk}/rotate/", {"overlap_seconds": -5}, format="json")
    assert r.status_code == 400 and "overlap_seconds" in r.json()["errors"]


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


def test_subscription_needing_approval_is_approved_by_an_admin(
    bob: User, alice: User, bob_app: Consumer, acme_api: Api, client_for: Any
) -> None:
    client_for(alice).patch(f"{V1}/apis/{acme_api.pk}/", {"subscription_approval": "manual"}, format="json")
    c = client_for(bob)
    r = c.post(f"{V1}/subscriptions/", {"consumer_id": bob_app.pk, "api_id": acme_api.pk}, format="json")
    assert r.status_code == 201 and r.json()["status"] == "pending" and r.json()["id"].startswith("sub_")
    sub_id = r.json()["id"]
    assert c.post(f"{V1}/subscriptions/{sub_id}/approve/").status_code == 403
    r = client_for(alice).post(f"{V1}/subscriptions/{sub_id}/approve/", {"note": "ok"}, format="json")
    assert r.json()["status"] == "active" and r.json()["decided_by"] == "alice"


def test_admin_rejects_and_developer_cancels_subscriptions(
    bob: User, alice: User, bob_app: Consumer, acme_api: Api, client_for: Any
) -> None:
    client_for(alice).patch(f"{V1}/apis/{acme_api.pk}/", {"subscription_approval": "manual"}, format="json")
    c = client_for(bob)
    first = c.post(f"{V1}/subscriptions/", {"consumer_id": bob_app.pk, "api_id": acme_api.pk}, format="json").json()
    assert client_for(alice).post(f"{V1}/subscriptions/{first['id']}/reject/").json()["status"] == "rejected"
    second = c.post(f"{V1}/subscriptions/", {"consumer_id": bob_app.pk, "api_id": acme_api.pk}, format="json").json()
    assert c.post(f"{V1}/subscriptions/{second['id']}/cancel/").json()["status"] == "cancelled"
    r = c.post(f"{V1}/subscriptions/{second['id']}/cancel/")
    assert r.status_code == 400 and "status" in r.json()["errors"]


def test_subscription_list_filters_by_api_consumer_and_status(
    alice: User, bob_subscription: Subscription, client_for: Any
) -> None:
    c = client_for(alice)
    sub = bob_subscription
    assert c.get(f"{V1}/subscriptions/?api_id={sub.api_id}&consumer_id={sub.consumer_id}").json()["count"] == 1
    assert c.get(f"{V1}/subscriptions/?status=pending").json()["count"] == 0
    assert c.get(f"{V1}/subscriptions/?status=active").json()["count"] == 1


def test_staff_sees_and_manages_every_tenant(
    staff: User, acme_world: dict[str, Any], carol: User, client_for: Any
) -> None:
    c = client_for(staff)
    assert {t["id"] for t in c.get(f"{V1}/tenants/").json()["results"]} == {"acme", "globex"}
    key = acme_world["key"]
    assert c.post(f"{V1}/keys/{key.pk}/revoke/").json()["active"] is False
    r = c.post(f"{V1}/apis/", api_body(tenant_id="globex"), format="json")
    assert r.status_code == 201 and r.json()["tenant_id"] == "globex"


# ---------------------------------------------------------------------------
# Audit events
# ---------------------------------------------------------------------------


def test_audit_events_are_read_only_and_filterable(alice: User, bob: User, acme_api: Api, client_for: Any) -> None:
    c = client_for(alice)
    c.patch(f"{V1}/apis/{acme_api.pk}/", {"description": "changed"}, format="json")
    events = c.get(f"{V1}/audit-events/?object_id={acme_api.pk}&action=api.update").json()["results"]
    assert len(events) == 1 and events[0]["actor"] == "alice"
    assert events[0]["changes"]["description"] == ["", "changed"]
    assert events[0]["request_id"] and events[0]["ip"] == "127.0.0.1"
    assert c.delete(f"{V1}/audit-events/{events[0]['id']}/").status_code == 405
    assert c.post(f"{V1}/audit-events/", {}, format="json").status_code == 405
    # Developers do not read the tenant's audit log.
    assert client_for(bob).get(f"{V1}/audit-events/").json()["count"] == 0
