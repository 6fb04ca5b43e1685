"""DELETE of APIs, plans and policies: refused (409) while in use, audited, and the gateways drop what went."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.invalidation import CONFIG_VERSION_KEY
from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, Plan, Policy, Subscription, Tenant, UsageRecord
from apimgmt.usage import add_minute
from tests.api.conftest import V1
from tests.api.test_cross_tenant import _snapshot
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.admin_diagnostics import backend_pid, what_the_admin_saw

pytestmark = pytest.mark.django_db


def config_version(client: redis.Redis) -> int:
    return int(client.get(CONFIG_VERSION_KEY) or 0)


def delete(client: Any, path: str, capture: Any) -> Any:
    """DELETE with the transaction's on-commit callbacks run, as a committed request would run them."""
    with capture(execute=True):
        return client.delete(path)


def assert_conflict(response: Any, *phrases: str) -> None:
    assert response.status_code == 409, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 409 and body["title"] == "Conflict"
    for phrase in phrases:
        assert phrase in body["detail"], body["detail"]


@pytest.fixture
def usage_of(acme: Tenant) -> Any:
    def make(api: Api) -> UsageRecord:
        # As the flusher writes it: the minute row and its hourly and daily rollups.
        add_minute(tenant_id=acme.pk, api_id=api.pk, timestamp="2026-01-01T10:00:00Z", status_code=200, request_count=7)
        return UsageRecord.objects.get(tenant=acme, api_id=api.pk)

    return make


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------


def test_a_retired_api_is_deleted_with_its_subscriptions_and_its_usage_stays(
    alice: User,
    acme_api: Api,
    bob_subscription: Subscription,
    usage_of: Any,
    client_for: Any,
    redis_client: redis.Redis,
    django_capture_on_commit_callbacks: Any,
) -> None:
    usage = usage_of(acme_api)
    c = client_for(alice)
    assert c.post(f"{V1}/apis/{acme_api.pk}/retire/").status_code == 200
    before = config_version(redis_client)

    r = delete(c, f"{V1}/apis/{acme_api.pk}/", django_capture_on_commit_callbacks)

    assert r.status_code == 204 and r.content == b""
    assert not Api.objects.filter(pk=acme_api.pk).exists()
    assert not Subscription.objects.filter(pk=bob_subscription.pk).exists()
    assert UsageRecord.objects.get(pk=usage.pk).api_id == acme_api.pk
    assert c.get(f"{V1}/apis/{acme_api.pk}/").status_code == 404
    usage_api = c.get(
        f"{V1}/usage/?api_id={acme_api.pk}&interval=day&from=2025-12-31T00:00:00Z&to=2026-01-02T00:00:00Z"
    )
    assert usage_api.json()["results"][0]["requests"] == 7
    event = AuditEvent.objects.get(action="api.delete", object_id=acme_api.pk)
    assert event.actor == alice and event.tenant_id == "acme"
    assert event.changes["api_name"] == "users" and event.changes["base_path"] == "/api/users/v1"
    assert event.changes["subscriptions_deleted"] == 1
    assert event.changes["subscriptions_deleted_by_status"] == {"cancelled": 1}
    assert config_version(redis_client) == before + 1


def test_a_draft_api_is_deleted(
    alice: User, acme: Tenant, client_for: Any, redis_client: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    draft = services.api_create(
        tenant=acme, api_name="draft", base_path="/draft", upstream_url="https://d.example.com", actor=None
    )
    before = config_version(redis_client)
    r = delete(client_for(alice), f"{V1}/apis/{draft.pk}/", django_capture_on_commit_callbacks)
    assert r.status_code == 204
    assert not Api.objects.filter(pk=draft.pk).exists()
    assert AuditEvent.objects.get(action="api.delete", object_id=draft.pk).changes["subscriptions_deleted"] == 0
    assert config_version(redis_client) == before + 1


@pytest.mark.parametrize("live_status", ["active", "deprecated"])
def test_a_live_api_must_be_retired_before_it_is_deleted(
    live_status: str, alice: User, acme_api: Api, bob_subscription: Subscription, client_for: Any
) -> None:
    if live_status == "deprecated":
        services.api_deprecate(api=acme_api, actor=None)
    c = client_for(alice)
    before = _snapshot()
    r = c.delete(f"{V1}/apis/{acme_api.pk}/")
    assert_conflict(r, f"is {live_status}", "Retire it first")
    assert _snapshot() == before


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------


def test_an_unused_plan_is_deleted(
    alice: User,
    acme_plan: Plan,
    acme_policy: Policy,
    client_for: Any,
    redis_client: redis.Redis,
    django_capture_on_commit_callbacks: Any,
) -> None:
    before = config_version(redis_client)
    r = delete(client_for(alice), f"{V1}/plans/{acme_plan.pk}/", django_capture_on_commit_callbacks)
    assert r.status_code == 204
    assert not Plan.objects.filter(pk=acme_plan.pk).exists()
    assert Policy.objects.filter(pk=acme_policy.pk).exists()  # its policies stay
    event = AuditEvent.objects.get(action="plan.delete", object_id=acme_plan.pk)
    assert event.changes == {"name": "gold", "approval": "auto", "policies": [acme_policy.pk]}
    assert config_version(redis_client) == before + 1


def test_a_plan_with_an_open_subscription_is_refused_with_the_count(
    alice: User, acme_plan: Plan, bob_subscription: Subscription, client_for: Any
) -> None:
    c = client_for(alice)
    before = _snapshot()
    r = c.delete(f"{V1}/plans/{acme_plan.pk}/")
    assert_conflict(r, "referenced by 1 subscription (1 active)", "move them to another plan (change-plan)")
    assert _snapshot() == before


def test_a_plan_left_only_by_closed_subscriptions_is_deleted_and_they_keep_their_history(
    alice: User, acme_plan: Plan, bob_subscription: Subscription, client_for: Any
) -> None:
    services.subscription_cancel(subscription=bob_subscription, actor=None)
    r = client_for(alice).delete(f"{V1}/plans/{acme_plan.pk}/")
    assert r.status_code == 204, r.content
    bob_subscription.refresh_from_db()
    assert (bob_subscription.status, bob_subscription.plan_id) == ("cancelled", None)
    audit = AuditEvent.objects.get(action="plan.delete", object_id=acme_plan.pk)
    assert audit.changes["closed_subscriptions_detached"] == [bob_subscription.pk]


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------


def test_an_unused_policy_is_deleted(
    alice: User, acme: Tenant, client_for: Any, redis_client: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    policy = services.policy_create(
        tenant=acme, name="spare", policy_type="quota", config={"requests_per_day": 10}, actor=None
    )
    before = config_version(redis_client)
    r = delete(client_for(alice), f"{V1}/policies/{policy.pk}/", django_capture_on_commit_callbacks)
    assert r.status_code == 204
    assert not Policy.objects.filter(pk=policy.pk).exists()
    event = AuditEvent.objects.get(action="policy.delete", object_id=policy.pk)
    assert event.changes["name"] == "spare" and event.changes["policy_type"] == "quota"
    assert config_version(redis_client) == before + 1


def test_a_policy_in_use_is_refused_naming_its_apis_and_plans(
    alice: User, acme: Tenant, acme_api: Api, acme_plan: Plan, acme_policy: Policy, client_for: Any
) -> None:
    services.api_update(api=acme_api, actor=None, policies=[acme_policy])
    c = client_for(alice)
    before = _snapshot()
    r = c.delete(f"{V1}/policies/{acme_policy.pk}/")
    assert_conflict(r, "attached to 1 API (users) and 1 plan (gold)", "detach it")
    assert _snapshot() == before

    # Detached from both, it goes.
    services.api_update(api=acme_api, actor=None, policies=[])
    services.plan_update(plan=acme_plan, actor=None, policies=[])
    assert c.delete(f"{V1}/policies/{acme_policy.pk}/").status_code == 204


def test_a_policy_used_by_many_plans_names_the_first_and_counts_the_rest(
    alice: User, acme: Tenant, acme_policy: Policy, client_for: Any
) -> None:
    for n in range(7):
        services.plan_create(tenant=acme, name=f"p{n}", policies=[acme_policy], actor=None)
    r = client_for(alice).delete(f"{V1}/policies/{acme_policy.pk}/")
    assert_conflict(r, "7 plans (p0, p1, p2, p3, p4 and 2 more)")


# ---------------------------------------------------------------------------
# Who may delete
# ---------------------------------------------------------------------------


def test_staff_deletes_in_any_tenant(
    staff: User, acme: Tenant, acme_plan: Plan, client_for: Any, django_capture_on_commit_callbacks: Any
) -> None:
    assert (
        delete(client_for(staff), f"{V1}/plans/{acme_plan.pk}/", django_capture_on_commit_callbacks).status_code == 204
    )


def test_developers_and_viewers_cannot_delete(
    bob: User, vera: User, acme: Tenant, acme_plan: Plan, acme_policy: Policy, client_for: Any
) -> None:
    public_retired = services.api_create(
        tenant=acme, api_name="old", base_path="/old", upstream_url="https://o.example.com", actor=None
    )
    services.api_retire(api=public_retired, actor=None)
    spare = services.policy_create(
        tenant=acme, name="spare", policy_type="quota", config={"requests_per_day": 10}, actor=None
    )
    clients = {"bob": client_for(bob), "vera": client_for(vera)}
    before = _snapshot()
    for c in clients.values():
        assert c.delete(f"{V1}/plans/{acme_plan.pk}/").status_code == 403
        assert c.delete(f"{V1}/policies/{spare.pk}/").status_code == 403
    # A developer reads only the routed catalog: a retired API is not theirs to see (404); a viewer sees it (403).
    assert clients["bob"].delete(f"{V1}/apis/{public_retired.pk}/").status_code == 404
    r = clients["vera"].delete(f"{V1}/apis/{public_retired.pk}/")
    assert r.status_code == 403 and r["Content-Type"] == "application/problem+json"
    assert _snapshot() == before


def test_a_developer_is_refused_on_a_live_catalog_api_before_any_conflict(
    bob: User, acme_api: Api, client_for: Any
) -> None:
    r = client_for(bob).delete(f"{V1}/apis/{acme_api.pk}/")
    assert r.status_code == 403  # the role check comes first: no 409 telling them how to get further


def test_another_tenants_objects_answer_404_and_stay(
    carol: User, acme_api: Api, acme_plan: Plan, acme_policy: Policy, client_for: Any
) -> None:
    services.api_retire(api=acme_api, actor=None)  # deletable, so a 404 is the scoping and not the state
    spare = services.plan_create(tenant=acme_api.tenant, name="spare", actor=None)
    c = client_for(carol)
    before = _snapshot()
    for path in (f"apis/{acme_api.pk}", f"plans/{spare.pk}", f"policies/{acme_policy.pk}"):
        r = c.delete(f"{V1}/{path}/")
        assert r.status_code == 404 and r["Content-Type"] == "application/problem+json", path
    assert _snapshot() == before


def test_the_schema_documents_delete_with_its_conflict(client: Client) -> None:
    paths = client.get("/mgmt/schema/?format=json").json()["paths"]
    for resource in ("apis", "plans", "policies"):
        operation = paths[f"/mgmt/v1/{resource}/{{id}}/"]["delete"]
        assert "204" in operation["responses"]
        assert operation["responses"]["409"]["content"]["application/problem+json"]


# ---------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------


@pytest.fixture
def in_process_gateway(settings: Any, tmp_path: Any) -> Iterator[InProcessGateway]:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    gateway = InProcessGateway()
    yield gateway
    from gateway.wsgi import reset_gateway

    reset_gateway()


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


def _status_within(gateway: InProcessGateway, path: str, key: str, wanted: int, seconds: float = 1.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        status = gateway.get(path, headers={"X-API-Key": key}).status
        if status == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_a_deleted_api_answers_404_at_the_gateway_and_frees_its_path(
    in_process_gateway: InProcessGateway,
    upstream: Recorder,
    acme: Tenant,
    alice: User,
    bob_app: Consumer,
    bob_key: Any,
    client_for: Any,
    redis_client: redis.Redis,
    django_capture_on_commit_callbacks: Any,
) -> None:
    key = bob_key[1]
    api = publish(acme, upstream.url + "/old", base_path="/api/orders")
    subscribe(bob_app, api)
    assert in_process_gateway.get("/api/orders/1", headers={"X-API-Key": key}).status == 200

    c = client_for(alice)
    with django_capture_on_commit_callbacks(execute=True):
        assert c.post(f"{V1}/apis/{api.pk}/retire/").status_code == 200
    assert _status_within(in_process_gateway, "/api/orders/1", key, 404) == 404
    assert delete(c, f"{V1}/apis/{api.pk}/", django_capture_on_commit_callbacks).status_code == 204
    assert _status_within(in_process_gateway, "/api/orders/1", key, 404) == 404

    # The retired API held its base path; deleted, the path is free for a new API, which the gateway routes.
    routed_before = len(upstream.paths)
    with django_capture_on_commit_callbacks(execute=True):
        new = publish(acme, upstream.url + "/new", base_path="/api/orders")
        subscribe(bob_app, new)
    assert _status_within(in_process_gateway, "/api/orders/1", key, 200) == 200
    assert upstream.paths[routed_before:] == ["/new/1"]


# ---------------------------------------------------------------------------
# The admin goes through the same services
# ---------------------------------------------------------------------------


def _admin_url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def test_admin_deletes_through_the_service_and_refuses_what_is_in_use(
    client: Client, staff: User, acme_api: Api, acme_plan: Plan, bob_subscription: Subscription
) -> None:
    client.force_login(staff)
    # In use: no delete page (403) and nothing removed.
    backend = backend_pid()
    answer = client.get(_admin_url(Api, "delete", acme_api.pk))
    # This once answered 404 in full CI runs only (two runs in three, never alone): say what the test saw then.
    assert answer.status_code == 403, what_the_admin_saw(answer, backend, acme_api, staff)
    answer = client.post(_admin_url(Plan, "delete", acme_plan.pk), {"post": "yes"})
    assert answer.status_code == 403, what_the_admin_saw(answer, backend, acme_plan, staff)
    assert Api.objects.filter(pk=acme_api.pk).exists() and Plan.objects.filter(pk=acme_plan.pk).exists()
    # Bulk delete would bypass the service: not offered.
    page = client.get(_admin_url(Api, "changelist")).content.decode()
    assert "delete_selected" not in page

    services.api_retire(api=acme_api, actor=None)
    r = client.post(_admin_url(Api, "delete", acme_api.pk), {"post": "yes"})
    assert r.status_code == 302
    assert not Api.objects.filter(pk=acme_api.pk).exists()
    event = AuditEvent.objects.get(action="api.delete", object_id=acme_api.pk)
    assert event.actor == staff and event.changes["subscriptions_deleted"] == 1


def test_admin_deletes_an_app_through_its_service_and_offers_no_bulk_delete(
    client: Client, staff: User, bob_app: Consumer, bob_key: tuple[ApiKey, str]
) -> None:
    # Bulk delete would skip consumer_delete: no revocation audited, gateways not told (the key kept working).
    client.force_login(staff)
    assert "delete_selected" not in client.get(_admin_url(Consumer, "changelist")).content.decode()
    assert client.post(_admin_url(Consumer, "delete", bob_app.pk), {"post": "yes"}).status_code == 302
    assert not Consumer.objects.filter(pk=bob_app.pk).exists()
    assert AuditEvent.objects.filter(action="consumer.delete", object_id=bob_app.pk, actor=staff).exists()
    assert AuditEvent.objects.filter(action="api_key.revoke", object_id=bob_key[0].pk).exists()
