"""Every service: the happy path, its audit event, and its validation errors; services are atomic."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.utils import timezone

from apimgmt import keys, services
from apimgmt.context import client_ip_var, request_id_var
from apimgmt.invalidation import read_config_version
from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, Plan, Policy, Subscription, Tenant

RATE = {"requests_per_minute": 1000, "burst_size": 100, "key_extraction": "consumer_id", "window_type": "sliding"}


def last_event(action: str) -> AuditEvent:
    return AuditEvent.objects.filter(action=action).latest("id")


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, list[str]]:
    return exc.value.message_dict


# Tenants ---------------------------------------------------------------------


def test_tenant_create_audits_with_request_context(db: Any, staff: User) -> None:
    rid = request_id_var.set("req-abcdef123")
    ip = client_ip_var.set("203.0.113.9")
    try:
        tenant = services.tenant_create(id="initech", name="Initech", timezone_name="Europe/Berlin", actor=staff)
    finally:
        request_id_var.reset(rid)
        client_ip_var.reset(ip)
    assert Tenant.objects.get(pk="initech").timezone == "Europe/Berlin"
    event = last_event("tenant.create")
    assert (event.actor, event.tenant_id, event.object_id) == (staff, tenant.id, "initech")
    assert (event.request_id, event.ip) == ("req-abcdef123", "203.0.113.9")


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"id": "Bad_ID", "name": "x"}, "id", "lowercase letters"),
        ({"id": "-x", "name": "x"}, "id", "lowercase letters"),
        ({"id": "ok", "name": ""}, "name", "cannot be blank"),
        ({"id": "ok", "name": "x", "timezone_name": "Mars/Base"}, "timezone", "not a known IANA time zone"),
    ],
)
def test_tenant_create_refuses_bad_input(db: Any, kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        services.tenant_create(actor=None, **kwargs)
    assert any(message in m for m in errors_of(exc)[field])
    assert not Tenant.objects.exists()
    assert not AuditEvent.objects.exists()


def test_duplicate_tenant_is_refused(acme: Tenant) -> None:
    with pytest.raises(ValidationError) as exc:
        services.tenant_create(id="acme", name="Again", actor=None)
    assert "already exists" in errors_of(exc)["id"][0]


def test_tenant_suspend_and_activate(acme: Tenant, redis_client: Any, django_capture_on_commit_callbacks: Any) -> None:
    before = read_config_version()
    with django_capture_on_commit_callbacks(execute=True):
        services.tenant_suspend(tenant=acme, actor=None)
    assert Tenant.objects.get(pk="acme").status == "suspended"
    assert last_event("tenant.suspend").changes == {"status": ["active", "suspended"]}
    assert read_config_version() > before
    services.tenant_activate(tenant=acme, actor=None)
    assert Tenant.objects.get(pk="acme").status == "active"


def test_membership_set_validates_role(acme: Tenant) -> None:
    user = User.objects.create_user("dora")
    with pytest.raises(ValidationError) as exc:
        services.membership_set(tenant=acme, user=user, role="owner", actor=None)
    assert "role must be one of" in errors_of(exc)["role"][0]
    services.membership_set(tenant=acme, user=user, role="viewer", actor=None)
    services.membership_set(tenant=acme, user=user, role="admin", actor=None)
    assert last_event("membership.update").changes == {"role": ["viewer", "admin"]}


# Policies and plans ----------------------------------------------------------


def test_policy_create_accepts_the_guide_config_and_audits(acme: Tenant) -> None:
    policy = services.policy_create(tenant=acme, name="std", policy_type="rate_limiting", config=RATE, actor=None)
    assert policy.id.startswith("pol_") and policy.config == RATE
    assert last_event("policy.create").changes["config"] == RATE


def test_policy_create_names_the_bad_field(acme: Tenant) -> None:
    with pytest.raises(ValidationError) as exc:
        services.policy_create(
            tenant=acme, name="bad", policy_type="rate_limiting", config={"requests_per_minute": -1}, actor=None
        )
    assert errors_of(exc)["config"] == ["requests_per_minute must be a positive integer."]
    with pytest.raises(ValidationError) as exc:
        services.policy_create(tenant=acme, name="bad", policy_type="nope", config={}, actor=None)
    assert "policy_type" in errors_of(exc)
    with pytest.raises(ValidationError) as exc:
        services.policy_create(
            tenant=acme, name="bad", policy_type="quota", config={"requests_per_day": 5}, mode="loud", actor=None
        )
    assert "mode" in errors_of(exc)
    assert not Policy.objects.exists()


def test_policy_names_are_unique_per_tenant(acme: Tenant, globex: Tenant) -> None:
    services.policy_create(tenant=acme, name="std", policy_type="quota", config={"requests_per_day": 5}, actor=None)
    services.policy_create(tenant=globex, name="std", policy_type="quota", config={"requests_per_day": 5}, actor=None)
    with pytest.raises(ValidationError) as exc:
        services.policy_create(tenant=acme, name="std", policy_type="quota", config={"requests_per_day": 5}, actor=None)
    assert "already exists" in str(exc.value)


def test_policy_update(acme: Tenant) -> None:
    policy = services.policy_create(
        tenant=acme, name="std", policy_type="quota", config={"requests_per_day": 5}, actor=None
    )
    services.policy_update(policy=policy, config={"requests_per_day": 10}, mode="shadow", actor=None)
    policy.refresh_from_db()
    assert policy.config["requests_per_day"] == 10 and policy.mode == "shadow"
    assert last_event("policy.update").changes["mode"] == ["enforce", "shadow"]
    with pytest.raises(ValidationError) as exc:
        services.policy_update(policy=policy, policy_type="rate_limiting", actor=None)
    assert "cannot be changed" in errors_of(exc)["policy_type"][0]


def test_plan_create_and_update(acme: Tenant, globex: Tenant) -> None:
    quota = services.policy_create(
        tenant=acme, name="q", policy_type="quota", config={"requests_per_day": 5}, actor=None
    )
    plan = services.plan_create(tenant=acme, name="gold", policies=[quota], approval="manual", actor=None)
    assert plan.id.startswith("pln_") and list(plan.policies.all()) == [quota]
    assert last_event("plan.create").changes["policies"] == [quota.id]
    services.plan_update(plan=plan, policies=[], approval="auto", actor=None)
    plan.refresh_from_db()
    assert plan.approval == "auto" and not plan.policies.exists()
    foreign = services.policy_create(
        tenant=globex, name="q", policy_type="quota", config={"requests_per_day": 5}, actor=None
    )
    with pytest.raises(ValidationError) as exc:
        services.plan_create(tenant=acme, name="bad", policies=[foreign], actor=None)
    assert "Unknown policies" in errors_of(exc)["policies"][0]
    assert not Plan.objects.filter(name="bad").exists()


# APIs -------------------------------------------------------------------------


def test_api_create_with_targets_and_policies(
    acme: Tenant, redis_client: Any, django_capture_on_commit_callbacks: Any
) -> None:
    policy = services.policy_create(tenant=acme, name="std", policy_type="rate_limiting", config=RATE, actor=None)
    before = read_config_version()
    with django_capture_on_commit_callbacks(execute=True):
        api = services.api_create(
            tenant=acme,
            api_name="users",
            base_path="/api/users/v1",
            upstream_url="https://users.example.com/base",
            targets=[("https://users2.example.com/base", 3)],
            policies=[policy],
            status="active",
            actor=None,
        )
    assert api.id.startswith("api_") and api.status == "active"
    assert [(t.url, t.weight) for t in api.targets.all()] == [("https://users2.example.com/base", 3)]
    assert last_event("api.create").changes["base_path"] == "/api/users/v1"
    assert read_config_version() > before


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"base_path": "/admin/x"}, "base_path", "reserved prefix"),
        ({"base_path": "/a/../b"}, "base_path", "'.' or '..'"),
        ({"upstream_url": "http://10.0.0.1"}, "upstream_url", "loopback, private"),
        ({"upstream_url": "gopher://x"}, "upstream_url", "http:// or https://"),
        ({"key_header": "Bad Header"}, "key_header", "valid HTTP header name"),
        ({"key_query_param": "a b"}, "key_query_param", "may use letters"),
        ({"status": "live"}, "status", "status must be one of"),
        ({"connect_timeout": 0}, "connect_timeout", "greater than or equal"),
        ({"retries": 9}, "retries", "less than or equal"),
        ({"host": "http://x"}, "host", "DNS name"),
        ({"api_name": ""}, "api_name", "cannot be blank"),
        ({"colour": "red"}, "colour", "Unknown field"),
        ({"targets": [("https://ok.example.com", 0)]}, "targets", "weight must be"),
        ({"targets": [("http://127.0.0.1", 1)]}, "targets", "target 0"),
    ],
)
def test_api_create_refuses_bad_input(acme: Tenant, overrides: dict[str, Any], field: str, message: str) -> None:
    kwargs: dict[str, Any] = {
        "api_name": "users",
        "base_path": "/api/users",
        "upstream_url": "https://users.example.com",
    }
    kwargs.update(overrides)
    with pytest.raises(ValidationError) as exc:
        services.api_create(tenant=acme, actor=None, **kwargs)
    assert any(message in m for m in errors_of(exc)[field]), errors_of(exc)
    assert not Api.objects.exists()


def test_base_path_is_unique_per_host(acme: Tenant, globex: Tenant) -> None:
    base = {"api_name": "a", "base_path": "/v1", "upstream_url": "https://a.example.com", "actor": None}
    services.api_create(tenant=acme, **base)
    services.api_create(tenant=acme, **{**base, "api_name": "b"}, host="api.example.com")
    with pytest.raises(ValidationError) as exc:
        services.api_create(tenant=globex, **base)
    assert "already uses this base path" in str(exc.value)


def test_api_update_and_lifecycle(acme_api: Api) -> None:
    services.api_update(api=acme_api, upstream_url="https://users-v2.example.com", strip_path=False, actor=None)
    acme_api.refresh_from_db()
    assert acme_api.upstream_url == "https://users-v2.example.com" and acme_api.strip_path is False
    assert last_event("api.update").changes["strip_path"] == [True, False]
    with pytest.raises(ValidationError) as exc:
        services.api_update(api=acme_api, tenant_id="globex", actor=None)
    assert "cannot be changed" in errors_of(exc)["tenant_id"][0]
    sunset = timezone.now() + timedelta(days=30)
    services.api_deprecate(api=acme_api, sunset_at=sunset, actor=None)
    assert Api.objects.get(pk=acme_api.pk).sunset_at == sunset
    services.api_activate(api=acme_api, actor=None)
    services.api_retire(api=acme_api, actor=None)
    assert last_event("api.retired").changes["status"] == ["active", "retired"]
    with pytest.raises(ValidationError) as exc:
        services.api_activate(api=acme_api, actor=None)
    assert "cannot become active" in errors_of(exc)["status"][0]


def test_retiring_an_api_cancels_its_subscriptions(acme_api: Api, bob_app: Consumer) -> None:
    sub = services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    services.api_retire(api=acme_api, actor=None)
    assert Subscription.objects.get(pk=sub.pk).status == "cancelled"


# Consumers --------------------------------------------------------------------


def test_consumer_lifecycle(acme: Tenant, bob: User) -> None:
    consumer = services.consumer_create(tenant=acme, name="  mobile  ", owner=bob, actor=bob)
    assert consumer.id.startswith("con_") and consumer.name == "mobile"
    assert last_event("consumer.create").actor == bob
    services.consumer_update(consumer=consumer, name="mobile-app", actor=bob)
    services.consumer_block(consumer=consumer, actor=None)
    assert Consumer.objects.get(pk=consumer.pk).status == "blocked"
    services.consumer_unblock(consumer=consumer, actor=None)
    assert last_event("consumer.unblock").changes == {"status": ["blocked", "active"]}
    with pytest.raises(ValidationError) as exc:
        services.consumer_create(tenant=acme, name="mobile-app", owner=bob, actor=bob)
    assert "already has an app with this name" in str(exc.value)


def test_app_names_are_unique_per_owner_not_per_tenant(acme: Tenant, bob: User, alice: User) -> None:
    services.consumer_create(tenant=acme, name="billing", owner=bob, actor=bob)
    # Another developer's "billing" is neither blocked by bob's nor told that bob has one.
    services.consumer_create(tenant=acme, name="billing", owner=alice, actor=alice)
    services.consumer_create(tenant=acme, name="billing", actor=None)
    with pytest.raises(ValidationError) as exc:
        services.consumer_create(tenant=acme, name="billing", actor=None)
    assert "without an owner already has this name" in str(exc.value)
    with pytest.raises(ValidationError):
        services.consumer_create(tenant=acme, name="billing", owner=bob, actor=bob)
    assert Consumer.objects.filter(name="billing").count() == 3


def test_consumer_delete_revokes_its_keys_first(bob_app: Consumer, bob_key: tuple[ApiKey, str]) -> None:
    consumer_id = bob_app.pk
    services.consumer_delete(consumer=bob_app, actor=None)
    assert not Consumer.objects.filter(pk=consumer_id).exists()
    assert AuditEvent.objects.filter(action="api_key.revoke", object_id=bob_key[0].pk).exists()
    assert AuditEvent.objects.filter(action="consumer.delete", object_id=consumer_id).exists()


# Keys -------------------------------------------------------------------------


def test_key_create_returns_plaintext_once_and_stores_only_the_hash(bob_app: Consumer) -> None:
    expires = timezone.now() + timedelta(days=7)
    key, plaintext = services.api_key_create(consumer=bob_app, name="ci", expires_at=expires, actor=None)
    assert keys.is_well_formed(plaintext)
    stored = ApiKey.objects.get(pk=key.pk)
    assert stored.key_id.startswith("key_") and stored.key_prefix == plaintext[:12]
    assert stored.key_hash == keys.hash_key(plaintext) and plaintext not in str(vars(stored))
    event = last_event("api_key.create")
    assert plaintext not in str(event.changes) and event.changes["key_prefix"] == plaintext[:12]


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"expires_at": "past"}, "expires_at", "in the future"),
        ({"expires_at": "naive"}, "expires_at", "time zone"),
        ({"name": "n" * 101}, "name", "at most 100"),
    ],
)
def test_key_create_refuses_bad_input(bob_app: Consumer, kwargs: dict[str, Any], field: str, message: str) -> None:
    if kwargs.get("expires_at") == "past":
        kwargs["expires_at"] = timezone.now() - timedelta(seconds=1)
    elif kwargs.get("expires_at") == "naive":
        kwargs["expires_at"] = timezone.now().replace(tzinfo=None) + timedelta(days=1)
    with pytest.raises(ValidationError) as exc:
        services.api_key_create(consumer=bob_app, actor=None, **kwargs)
    assert message in errors_of(exc)[field][0]
    assert not ApiKey.objects.exists()


def test_blocked_consumer_gets_no_new_keys(bob_app: Consumer) -> None:
    services.consumer_block(consumer=bob_app, actor=None)
    with pytest.raises(ValidationError) as exc:
        services.api_key_create(consumer=bob_app, actor=None)
    assert "blocked" in errors_of(exc)["consumer_id"][0]


def test_rotate_creates_a_successor_and_shortens_the_old_key(bob_key: tuple[ApiKey, str]) -> None:
    old, _ = bob_key
    successor, plaintext = services.api_key_rotate(key=old, overlap_seconds=600, actor=None)
    old.refresh_from_db()
    assert successor.rotated_from_id == old.pk and keys.is_well_formed(plaintext)
    assert old.active and old.expires_at is not None
    assert timedelta(seconds=590) < old.expires_at - timezone.now() <= timedelta(seconds=600)
    assert last_event("api_key.rotate").changes["successor"] == successor.pk


def test_rotate_with_zero_overlap_ends_the_old_key_now(bob_key: tuple[ApiKey, str]) -> None:
    old, _ = bob_key
    services.api_key_rotate(key=old, overlap_seconds=0, actor=None)
    old.refresh_from_db()
    assert not old.is_usable()


@pytest.mark.parametrize("overlap", [-1, 10**9, "60", 1.5, True])
def test_rotate_refuses_bad_overlap(bob_key: tuple[ApiKey, str], overlap: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        services.api_key_rotate(key=bob_key[0], overlap_seconds=overlap, actor=None)
    assert "overlap_seconds must be an integer" in errors_of(exc)["overlap_seconds"][0]
    assert ApiKey.objects.count() == 1


def test_revoke_is_one_way(bob_key: tuple[ApiKey, str]) -> None:
    key, _ = bob_key
    services.api_key_revoke(key=key, actor=None)
    key.refresh_from_db()
    assert not key.active and key.revoked_at is not None
    assert last_event("api_key.revoke").object_id == key.pk
    services.api_key_revoke(key=key, actor=None)  # idempotent, no second event
    assert AuditEvent.objects.filter(action="api_key.revoke").count() == 1
    with pytest.raises(ValidationError):
        services.api_key_rotate(key=key, actor=None)


# Subscriptions ----------------------------------------------------------------


def test_auto_subscription_is_active_at_once(acme_api: Api, bob_app: Consumer) -> None:
    sub = services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    assert sub.id.startswith("sub_") and sub.status == "active"
    assert last_event("subscription.request").changes["status"] == "active"


def test_manual_plan_waits_for_approval(acme: Tenant, acme_api: Api, bob_app: Consumer, alice: User) -> None:
    plan = services.plan_create(tenant=acme, name="gold", approval="manual", actor=None)
    sub = services.subscription_request(consumer=bob_app, api=acme_api, plan=plan, actor=None)
    assert sub.status == "pending"
    services.subscription_approve(subscription=sub, actor=alice, note="ok")
    sub.refresh_from_db()
    assert (sub.status, sub.decided_by) == ("active", alice)
    with pytest.raises(ValidationError) as exc:
        services.subscription_reject(subscription=sub, actor=alice)
    assert "cannot become rejected" in errors_of(exc)["status"][0]
    services.subscription_cancel(subscription=sub, actor=alice)
    assert Subscription.objects.get(pk=sub.pk).status == "cancelled"


def test_manual_api_rejection(acme_api: Api, bob_app: Consumer, alice: User) -> None:
    services.api_update(api=acme_api, subscription_approval="manual", actor=None)
    sub = services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    services.subscription_reject(subscription=sub, actor=alice, note="no")
    assert last_event("subscription.reject").changes == {"status": ["pending", "rejected"], "note": "no"}


def test_subscription_refusals(acme: Tenant, globex: Tenant, acme_api: Api, bob_app: Consumer) -> None:
    services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    assert "already has a pending or active" in errors_of(exc)["api_id"][0]
    other = services.consumer_create(tenant=globex, name="g", actor=None)
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=other, api=acme_api, actor=None)
    assert "Unknown API" in errors_of(exc)["api_id"][0]
    draft = services.api_create(
        tenant=acme, api_name="d", base_path="/d", upstream_url="https://d.example.com", actor=None
    )
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=draft, actor=None)
    assert "draft" in errors_of(exc)["api_id"][0]


# Plans offered by an API ----------------------------------------------------------


@pytest.fixture
def starter(acme: Tenant) -> Plan:
    limit = services.policy_create(
        tenant=acme, name="5-a-minute", policy_type="rate_limiting", config={"requests_per_minute": 5}, actor=None
    )
    return services.plan_create(tenant=acme, name="starter", policies=[limit], actor=None)


def test_an_api_offering_plans_refuses_a_subscription_without_one(
    acme: Tenant, acme_api: Api, bob_app: Consumer, starter: Plan
) -> None:
    services.api_update(api=acme_api, plans=[starter], actor=None)
    assert last_event("api.update").changes["plans"] == [[], [starter.pk]]
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    assert errors_of(exc)["plan_id"] == ["API 'users' is offered on plans starter: choose one of them."]
    assert not Subscription.objects.exists()
    sub = services.subscription_request(consumer=bob_app, api=acme_api, plan=starter, actor=None)
    assert (sub.status, sub.plan) == ("active", starter)


def test_a_plan_the_api_does_not_offer_is_refused(
    acme: Tenant, globex: Tenant, acme_api: Api, bob_app: Consumer, starter: Plan
) -> None:
    gold = services.plan_create(tenant=acme, name="gold", actor=None)
    services.api_update(api=acme_api, plans=[starter], actor=None)
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=acme_api, plan=gold, actor=None)
    assert errors_of(exc)["plan_id"] == ["Plan 'gold' is not offered for API 'users'; choose one of: starter."]
    foreign = services.plan_create(tenant=globex, name="starter", actor=None)
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=acme_api, plan=foreign, actor=None)
    assert errors_of(exc)["plan_id"] == ["Unknown plan for this consumer's tenant."]
    assert not Subscription.objects.exists()


def test_an_api_offers_only_plans_of_its_own_tenant(acme: Tenant, globex: Tenant, starter: Plan) -> None:
    foreign = services.plan_create(tenant=globex, name="g", actor=None)
    with pytest.raises(ValidationError) as exc:
        services.api_create(
            tenant=acme, api_name="x", base_path="/x", upstream_url="https://x.example.com", plans=[foreign], actor=None
        )
    assert errors_of(exc)["plans"] == [f"Unknown plans for this tenant: {foreign.pk}."]
    api = services.api_create(
        tenant=acme, api_name="x", base_path="/x", upstream_url="https://x.example.com", plans=[starter], actor=None
    )
    with pytest.raises(ValidationError):
        services.api_update(api=api, plans=[starter, foreign], actor=None)
    assert list(api.plans.all()) == [starter]
    assert last_event("api.create").changes["plans"] == [starter.pk]


def test_subscriptions_made_before_the_api_offered_plans_keep_working(
    acme_api: Api, bob_app: Consumer, starter: Plan
) -> None:
    old = services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    services.api_update(api=acme_api, plans=[starter], actor=None)
    old.refresh_from_db()
    assert (old.status, old.plan) == ("active", None)
    # Taking a plan off the list keeps its subscribers on it; deleting it drops the offer.
    services.subscription_cancel(subscription=old, actor=None)
    on_starter = services.subscription_request(consumer=bob_app, api=acme_api, plan=starter, actor=None)
    services.api_update(api=acme_api, plans=[], actor=None)
    on_starter.refresh_from_db()
    assert (on_starter.status, on_starter.plan) == ("active", starter)


def test_an_api_with_no_plans_still_takes_subscriptions_without_one(acme_api: Api, bob_app: Consumer) -> None:
    assert services.subscription_request(consumer=bob_app, api=acme_api, actor=None).status == "active"


def test_rotating_a_blocked_consumers_key_is_refused(bob_key: tuple[ApiKey, str]) -> None:
    services.consumer_block(consumer=bob_key[0].consumer, actor=None)
    with pytest.raises(ValidationError) as exc:
        services.api_key_rotate(key=bob_key[0], actor=None)
    assert "blocked" in errors_of(exc)["consumer_id"][0]
    assert ApiKey.objects.count() == 1


def test_consumer_owner_must_be_a_member_of_the_tenant(acme: Tenant, carol: User, bob: User) -> None:
    with pytest.raises(ValidationError) as exc:
        services.consumer_create(tenant=acme, name="x", owner=carol, actor=None)
    assert "member of this consumer's tenant" in errors_of(exc)["owner"][0]
    consumer = services.consumer_create(tenant=acme, name="x", owner=bob, actor=None)
    with pytest.raises(ValidationError):
        services.consumer_update(consumer=consumer, owner=carol, actor=None)
    assert Consumer.objects.get(pk=consumer.pk).owner == bob


def test_deleting_an_offered_plan_takes_it_off_its_apis_and_says_so(acme_api: Api, starter: Plan) -> None:
    services.api_update(api=acme_api, plans=[starter], actor=None)
    services.plan_delete(plan=starter, actor=None)
    assert not acme_api.plans.exists()
    assert last_event("plan.delete").changes["no_longer_offered_by"] == [acme_api.pk]


def test_an_archived_plan_is_not_suggested(acme: Tenant, acme_api: Api, bob_app: Consumer, starter: Plan) -> None:
    old = services.plan_create(tenant=acme, name="legacy", actor=None)
    services.api_update(api=acme_api, plans=[starter, old], actor=None)
    services.plan_archive(plan=old, actor=None)
    with pytest.raises(ValidationError) as exc:
        services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    assert errors_of(exc)["plan_id"] == ["API 'users' is offered on plans starter: choose one of them."]
