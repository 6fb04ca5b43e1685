"""The Django admin: every page renders, writes go through services, the key is shown once, tenants are isolated."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apimgmt import keys, services
from apimgmt.models import (
    Api,
    ApiKey,
    ApiToken,
    AuditEvent,
    Consumer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    TenantMembership,
    UpstreamTarget,
    UsageRecord,
)
from apimgmt.tokens import api_token_create
from tests.support.admin_diagnostics import backend_pid, what_the_admin_saw

ROOT = Path(__file__).resolve().parents[2]

MODELS = [
    Tenant,
    TenantMembership,
    Api,
    Consumer,
    ApiKey,
    ApiToken,
    Plan,
    Policy,
    Subscription,
    UsageRecord,
    AuditEvent,
]
KEY_RE = re.compile(r"ak_live_[0-9A-Za-z]{38}")


@pytest.fixture
def admin_client_(client: Client, staff: User) -> Client:
    client.force_login(staff)
    return client


def _url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def test_staff_logs_in_with_the_login_form(client: Client, staff: User) -> None:
    response = client.post(
        reverse("admin:login"), {"username": "root", "password": "root-password-123", "next": "/admin/"}
    )
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 200


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_changelist_renders(
    admin_client_: Client, model: type, acme_api: Api, bob_key: tuple[ApiKey, str]
) -> None:
    response = admin_client_.get(_url(model, "changelist"))
    assert response.status_code == 200


@pytest.mark.parametrize("model", [m for m in MODELS if m not in (UsageRecord, AuditEvent)], ids=lambda m: m.__name__)
def test_every_add_page_renders(admin_client_: Client, model: type) -> None:
    assert admin_client_.get(_url(model, "add")).status_code == 200


def test_change_pages_render(admin_client_: Client, staff: User, acme_api: Api, bob_key: tuple[ApiKey, str]) -> None:
    key = bob_key[0]
    backend = backend_pid()
    for model, pk in ((Api, acme_api.pk), (ApiKey, key.pk), (Consumer, key.consumer_id), (Tenant, "acme")):
        answer = admin_client_.get(_url(model, "change", pk))
        # This once answered 404 in a full CI run only: say what the test saw then.
        assert answer.status_code == 200, what_the_admin_saw(answer, backend, model.objects.get(pk=pk), staff)


def test_creating_a_key_shows_the_plaintext_exactly_once(admin_client_: Client, bob_app: Consumer) -> None:
    response = admin_client_.post(
        _url(ApiKey, "add"),
        {"consumer": bob_app.pk, "name": "from-admin", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )
    assert response.status_code == 200
    shown = KEY_RE.findall(response.content.decode())
    assert len(set(shown)) == 1
    plaintext = shown[0]
    key = ApiKey.objects.get(name="from-admin")
    assert key.key_hash == keys.hash_key(plaintext)
    assert AuditEvent.objects.filter(action="api_key.create", object_id=key.pk).exists()
    # Never again: not on the list, not on the change page.
    for url in (_url(ApiKey, "changelist"), _url(ApiKey, "change", key.pk), _url(Consumer, "change", bob_app.pk)):
        assert plaintext not in admin_client_.get(url).content.decode()


def test_key_create_errors_are_shown_on_the_form(admin_client_: Client, bob_app: Consumer) -> None:
    services.consumer_block(consumer=bob_app, actor=None)
    response = admin_client_.post(_url(ApiKey, "add"), {"consumer": bob_app.pk, "name": "x"})
    assert response.status_code == 200
    assert "This consumer is blocked" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_revoked_keys_are_read_only(admin_client_: Client, bob_key: tuple[ApiKey, str]) -> None:
    key = services.api_key_revoke(key=bob_key[0], actor=None)
    page = admin_client_.get(_url(ApiKey, "change", key.pk)).content.decode()
    assert 'name="name"' not in page and 'name="_save"' not in page


def test_admin_actions_report_counts(admin_client_: Client, bob_key: tuple[ApiKey, str], acme_api: Api) -> None:
    key = bob_key[0]
    response = admin_client_.post(
        _url(ApiKey, "changelist"), {"action": "rotate_keys", "_selected_action": [key.pk]}, follow=True
    )
    body = response.content.decode()
    assert "Rotated 1 object." in body
    assert len(set(KEY_RE.findall(body))) == 1  # the successor's plaintext, once
    response = admin_client_.post(
        _url(ApiKey, "changelist"),
        {"action": "revoke_keys", "_selected_action": list(ApiKey.objects.values_list("pk", flat=True))},
        follow=True,
    )
    assert "Revoked 2 objects." in response.content.decode()
    assert not ApiKey.objects.filter(active=True).exists()
    response = admin_client_.post(
        _url(Api, "changelist"), {"action": "deprecate_apis", "_selected_action": [acme_api.pk]}, follow=True
    )
    assert "Deprecated 1 object." in response.content.decode()
    assert Api.objects.get(pk=acme_api.pk).status == "deprecated"


def test_subscription_approval_action(admin_client_: Client, acme: Tenant, acme_api: Api, bob_app: Consumer) -> None:
    plan = services.plan_create(tenant=acme, name="gold", approval="manual", actor=None)
    sub = services.subscription_request(consumer=bob_app, api=acme_api, plan=plan, actor=None)
    response = admin_client_.post(
        _url(Subscription, "changelist"), {"action": "approve_subscriptions", "_selected_action": [sub.pk]}, follow=True
    )
    assert "Approved 1 object." in response.content.decode()
    assert Subscription.objects.get(pk=sub.pk).status == "active"
    response = admin_client_.post(
        _url(Subscription, "changelist"), {"action": "reject_subscriptions", "_selected_action": [sub.pk]}, follow=True
    )
    assert "cannot become rejected" in response.content.decode()


def test_api_form_shows_validation_errors_next_to_the_field(admin_client_: Client, acme: Tenant) -> None:
    response = admin_client_.post(
        _url(Api, "add"),
        {
            "tenant": "acme",
            "api_name": "x",
            "base_path": "/admin/oops",
            "upstream_url": "https://x.example.com",
            "status": "draft",
            "key_header": "X-API-Key",
            "connect_timeout": 2,
            "read_timeout": 30,
            "total_timeout": 60,
            "retries": 1,
            "cb_failure_threshold": 5,
            "cb_recovery_timeout": 30,
            "visibility": "public",
            "subscription_approval": "auto",
            "targets-TOTAL_FORMS": 0,
            "targets-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 200
    assert "reserved prefix" in response.content.decode()
    assert not Api.objects.exists()


def test_api_created_in_the_admin_goes_through_the_service(admin_client_: Client, acme: Tenant) -> None:
    response = admin_client_.post(
        _url(Api, "add"),
        {
            "tenant": "acme",
            "api_name": "orders",
            "base_path": "/orders",
            "upstream_url": "https://orders.example.com",
            "status": "active",
            "key_header": "X-API-Key",
            "connect_timeout": 2,
            "read_timeout": 30,
            "total_timeout": 60,
            "retries": 1,
            "cb_failure_threshold": 5,
            "cb_recovery_timeout": 30,
            "visibility": "public",
            "subscription_approval": "auto",
            "strip_path": "on",
            "targets-TOTAL_FORMS": 1,
            "targets-INITIAL_FORMS": 0,
            "targets-0-url": "https://orders2.example.com",
            "targets-0-weight": 2,
            # The settings the add form shows pre-filled, posted back as a browser would.
            "websocket_max_connections": 10,
            "websocket_idle_timeout": 300,
            "websocket_max_message_bytes": 1048576,
        },
    )
    errors = response.context["adminform"].form.errors if response.status_code == 200 else {}
    assert response.status_code == 302, errors
    api = Api.objects.get(base_path="/orders")
    assert api.id.startswith("api_")
    assert list(UpstreamTarget.objects.filter(api=api).values_list("url", "weight")) == [
        ("https://orders2.example.com", 2)
    ]
    assert AuditEvent.objects.filter(action="api.create", object_id=api.pk).exists()


@pytest.fixture
def scoped_staff(acme: Tenant) -> User:
    """Staff, not superuser, member of acme only, with view/change permissions on every model."""
    user = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=user, role="admin", actor=None)
    return user


def test_tenant_scoped_staff_cannot_see_another_tenants_rows(
    client: Client, scoped_staff: User, globex: Tenant, acme_api: Api
) -> None:
    other_api = services.api_create(
        tenant=globex, api_name="g", base_path="/g", upstream_url="https://g.example.com", actor=None
    )
    other_consumer = services.consumer_create(tenant=globex, name="g-app", actor=None)
    other_key, plaintext = services.api_key_create(consumer=other_consumer, actor=None)
    client.force_login(scoped_staff)
    listing = client.get(_url(Api, "changelist")).content.decode()
    assert acme_api.api_name in listing and other_api.pk not in listing
    for model, pk in ((Api, other_api.pk), (Consumer, other_consumer.pk), (ApiKey, other_key.pk), (Tenant, "globex")):
        assert client.get(_url(model, "change", pk)).status_code == 404, model
        assert client.post(_url(model, "change", pk), {"name": "hijacked"}).status_code in (403, 404), model
    assert client.get(_url(Tenant, "change", "acme")).status_code == 200
    assert Consumer.objects.get(pk=other_consumer.pk).name == "g-app"
    assert plaintext not in client.get(_url(ApiKey, "changelist")).content.decode()


def test_management_token_is_shown_once_and_can_be_revoked(admin_client_: Client, staff: User) -> None:
    from apimgmt.tokens import api_token_authenticate

    response = admin_client_.post(
        _url(ApiToken, "add"), {"user": staff.pk, "name": "ci", "expires_at_0": "", "expires_at_1": ""}, follow=True
    )
    found = re.findall(r"amt_[0-9A-Za-z]{40}", response.content.decode())
    assert len(set(found)) == 1
    token = ApiToken.objects.get(name="ci")
    assert api_token_authenticate(found[0]) == token
    assert found[0] not in admin_client_.get(_url(ApiToken, "changelist")).content.decode()
    response = admin_client_.post(
        _url(ApiToken, "changelist"), {"action": "revoke_tokens", "_selected_action": [token.pk]}, follow=True
    )
    assert "Revoked 1 object." in response.content.decode()
    assert api_token_authenticate(found[0]) is None


def test_new_key_is_never_stored_in_a_message_cookie_or_the_session(admin_client_: Client, bob_app: Consumer) -> None:
    from django.contrib.sessions.models import Session

    response = admin_client_.post(_url(ApiKey, "add"), {"consumer": bob_app.pk, "name": "once"})
    plaintext = KEY_RE.findall(response.content.decode())[0]
    assert "no-store" in response["Cache-Control"]
    assert all(plaintext not in morsel.value for morsel in response.cookies.values())
    assert all(plaintext not in str(s.get_decoded()) for s in Session.objects.all())
    follow_up = admin_client_.get("/admin/")
    assert plaintext not in follow_up.content.decode()


def test_staff_who_are_only_developers_of_a_tenant_administer_nothing(
    client: Client, acme: Tenant, acme_api: Api
) -> None:
    user = User.objects.create_user("dev-staff", "d@example.com", "dev-staff-password-1", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=user, role="developer", actor=None)
    client.force_login(user)
    assert client.get(_url(Api, "change", acme_api.pk)).status_code == 404
    assert acme_api.api_name not in client.get(_url(Api, "changelist")).content.decode()
    assert client.get(_url(Tenant, "change", "acme")).status_code == 404


def test_consumer_owner_must_belong_to_the_tenant(admin_client_: Client, bob_app: Consumer, carol: User) -> None:
    response = admin_client_.post(
        _url(Consumer, "change", bob_app.pk), {"name": "bob-app", "description": "", "owner": carol.pk}
    )
    assert response.status_code == 200
    assert "must be a member of this consumer" in response.content.decode()
    assert Consumer.objects.get(pk=bob_app.pk).owner.username == "bob"


@pytest.fixture
def two_tenants_of_rows(
    acme: Tenant, globex: Tenant, bob_key: tuple[ApiKey, str], acme_api: Api, carol: User
) -> list[str]:
    """Rows of every kind in acme and in globex; returns the strings of globex's that must never leak to acme."""
    for tenant, prefix in ((acme, "acme"), (globex, "globex")):
        policy = services.policy_create(
            tenant=tenant,
            name=f"{prefix}-burst",
            policy_type="rate_limiting",
            config={"requests_per_minute": 10},
            actor=None,
        )
        plan = services.plan_create(tenant=tenant, name=f"{prefix}-platinum-plan", policies=[policy], actor=None)
        api = (
            acme_api
            if tenant == acme
            else services.api_create(
                tenant=tenant,
                api_name="globex-orders",
                base_path="/globex/orders",
                upstream_url="https://orders.globex.example.com",
                status="active",
                policies=[policy],
                actor=None,
            )
        )
        consumer = (
            bob_key[0].consumer
            if tenant == acme
            else services.consumer_create(tenant=tenant, name="globex-app", owner=carol, actor=None)
        )
        key = bob_key[0] if tenant == acme else services.api_key_create(consumer=consumer, name="g", actor=None)[0]
        subscription = services.subscription_request(consumer=consumer, api=api, plan=plan, actor=None)
        UsageRecord.objects.create(
            tenant=tenant,
            api_id=api.pk,
            consumer_id=consumer.pk,
            key_id=key.pk,
            timestamp=timezone.now().replace(second=0, microsecond=0),
            status_code=200,
            request_count=1,
        )
    return [
        "globex",
        "Globex",
        "carol",
        api.pk,
        plan.pk,
        policy.pk,
        consumer.pk,
        key.pk,
        subscription.pk,
    ]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("query", ["", "?_facets=1"])
def test_a_tenant_admins_changelists_and_filters_never_name_another_tenant(
    client: Client, scoped_staff: User, two_tenants_of_rows: list[str], model: type, query: str
) -> None:
    client.force_login(scoped_staff)
    response = client.get(_url(model, "changelist") + query)
    assert response.status_code == 200
    page = response.content.decode()
    leaked = [text for text in two_tenants_of_rows if text in page]
    assert not leaked, f"{model.__name__} changelist shows {leaked}"


def test_every_relation_filter_in_the_admin_is_scoped() -> None:
    from django.contrib import admin as django_admin
    from django.test import RequestFactory

    from apimgmt.admin import NotFoundAdmin, ScopedRelatedFieldListFilter

    request = RequestFactory().get("/admin/")
    for model, model_admin in django_admin.site._registry.items():
        if model._meta.app_label != "apimgmt":
            continue
        assert isinstance(model_admin, NotFoundAdmin), model
        for entry in model_admin.get_list_filter(request):
            if isinstance(entry, str):
                field = model._meta.get_field(entry.split("__")[0])
                assert not field.is_relation, f"{model.__name__}.list_filter {entry!r} is not scoped"
            elif isinstance(entry, tuple) and issubclass(entry[1], django_admin.RelatedFieldListFilter):
                assert entry[1] is ScopedRelatedFieldListFilter, (model, entry)


@pytest.mark.parametrize(
    ("model", "lookup"),
    [
        (ApiKey, "key_hash__startswith"),
        (ApiKey, "key_hash"),
        (ApiKey, "key_hash__regex"),
        (Consumer, "keys__key_hash__startswith"),
        (Subscription, "consumer__keys__key_hash__startswith"),
        (ApiToken, "token_hash__startswith"),
        (TenantMembership, "user__password__startswith"),
    ],
)
def test_no_admin_lookup_answers_questions_about_a_stored_hash(
    admin_client_: Client, bob_key: tuple[ApiKey, str], staff: User, model: type, lookup: str
) -> None:
    token, _plaintext = api_token_create(user=staff, name="ci", actor=staff)
    secret = {ApiToken: token.token_hash, TenantMembership: staff.password}.get(model, bob_key[0].key_hash)
    real = secret[:6]
    fake = "0" * 6 if not real.startswith("0") else "f" * 6
    url = _url(model, "changelist")
    matching = admin_client_.get(f"{url}?{lookup}={real}")
    other = admin_client_.get(f"{url}?{lookup}={fake}")
    assert matching.status_code == other.status_code == 400
    assert matching.content == other.content


def test_the_consumer_list_counts_live_keys_only(admin_client_: Client, bob_app: Consumer) -> None:
    services.api_key_create(consumer=bob_app, name="live", actor=None)
    expired, _ = services.api_key_create(consumer=bob_app, name="expired", actor=None)
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    revoked, _ = services.api_key_create(consumer=bob_app, name="revoked", actor=None)
    services.api_key_revoke(key=revoked, actor=None)

    page = admin_client_.get(_url(Consumer, "changelist")).content.decode()
    assert '<td class="field-active_keys">1</td>' in page


def test_a_plan_only_closed_subscriptions_are_on_is_deleted_as_the_operations_guide_says(
    client: Client, staff: User, acme: Tenant, acme_api: Api, bob_app: Consumer
) -> None:
    plan = services.plan_create(tenant=acme, name="old", actor=None)
    services.api_update(api=acme_api, plans=[plan], actor=None)
    subscription = services.subscription_request(consumer=bob_app, api=acme_api, plan=plan, actor=None)
    client.force_login(staff)
    url = reverse("admin:apimgmt_plan_delete", args=[plan.pk])
    assert client.get(url).status_code == 403, "an open subscription is on it"

    services.subscription_cancel(subscription=subscription, actor=None)
    response = client.post(url, {"post": "yes"})
    assert response.status_code == 302, re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.content.decode()))[-1500:]
    assert not Plan.objects.filter(pk=plan.pk).exists()
    subscription.refresh_from_db()
    assert (subscription.status, subscription.plan) == ("cancelled", None)
    guide = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert (
        "Deleting a plan (allowed while no open subscription, pending or active, is on it or scheduled to move to "
        "it; cancelled and rejected ones on it are kept without a plan" in guide
    )
