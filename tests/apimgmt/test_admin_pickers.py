"""Admin pickers: policies and plans only of the object's tenant, "name (tenant)" while a tenant is not chosen,
and a subscription's plan picker offers only the plans its API offers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.models import Api, Consumer, Plan, Policy, Subscription, Tenant

pytestmark = pytest.mark.django_db


def _options(html: str, name: str) -> list[str]:
    """The labels of a <select name=...>'s options (the empty choice left out)."""
    select = re.search(rf'<select name="{name}"[^>]*>(.*?)</select>', html, re.S)
    assert select, f"no select {name}"
    return [
        label for value, label in re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select.group(1)) if value
    ]


@pytest.fixture
def world(acme: Tenant, globex: Tenant) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for tenant in (acme, globex):
        policy = services.policy_create(
            tenant=tenant, name=f"{tenant.id}-limit", policy_type="quota", config={"requests_per_day": 9}, actor=None
        )
        rows[f"{tenant.id}_policy"] = policy
        rows[f"{tenant.id}_plan"] = services.plan_create(tenant=tenant, name="gold", policies=[policy], actor=None)
    rows["acme_silver"] = services.plan_create(tenant=acme, name="silver", actor=None)
    rows["acme_api"] = services.api_create(
        tenant=acme,
        api_name="orders",
        base_path="/orders",
        upstream_url="https://orders.example.com",
        status="active",
        plans=[rows["acme_plan"]],
        actor=None,
    )
    return rows


@pytest.fixture
def root_client(client: Client, staff: User) -> Client:
    client.force_login(staff)
    return client


def test_an_apis_pickers_offer_only_its_tenants_policies_and_plans(root_client: Client, world: dict[str, Any]) -> None:
    html = root_client.get(reverse("admin:apimgmt_api_change", args=[world["acme_api"].pk])).content.decode()
    assert _options(html, "plans") == ["gold", "silver"]
    assert _options(html, "policies") == ["acme-limit (quota)"]


def test_an_add_form_without_a_tenant_labels_every_row_with_its_tenant(
    root_client: Client, world: dict[str, Any]
) -> None:
    html = root_client.get(reverse("admin:apimgmt_api_add")).content.decode()
    assert _options(html, "plans") == ["gold (acme)", "silver (acme)", "gold (globex)"]
    assert _options(html, "policies") == ["acme-limit (acme)", "globex-limit (globex)"]
    assert 'data-reload-with="tenant"' in html and "apimgmt/pickers.js" in html
    html = root_client.get(reverse("admin:apimgmt_api_add") + "?tenant=globex").content.decode()
    assert _options(html, "plans") == ["gold"]
    assert _options(html, "policies") == ["globex-limit (quota)"]
    html = root_client.get(reverse("admin:apimgmt_plan_add") + "?tenant=acme").content.decode()
    assert _options(html, "policies") == ["acme-limit (quota)"]


def test_a_foreign_plan_posted_with_an_api_is_a_form_error(root_client: Client, world: dict[str, Any]) -> None:
    response = root_client.post(
        reverse("admin:apimgmt_api_add"),
        {
            "tenant": "acme",
            "api_name": "spy",
            "base_path": "/spy",
            "upstream_url": "https://spy.example.com",
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
            "plans": [world["globex_plan"].pk],
            "targets-TOTAL_FORMS": 0,
            "targets-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 200
    # The posted tenant scopes the picker, so another tenant's plan is not a valid choice at all.
    assert f"Select a valid choice. {world['globex_plan'].pk} is not one of the available choices." in (
        response.content.decode()
    )
    assert not Api.objects.filter(api_name="spy").exists()


def test_a_tenant_admins_pickers_never_offer_another_tenants_rows(
    client: Client, world: dict[str, Any], acme: Tenant
) -> None:
    sam = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=sam, role="admin", actor=None)
    client.force_login(sam)
    for url in (reverse("admin:apimgmt_api_add"), reverse("admin:apimgmt_api_add") + "?tenant=globex"):
        html = client.get(url).content.decode()
        assert _options(html, "plans") == ["gold", "silver"]
        assert _options(html, "policies") == ["acme-limit (quota)"]


def test_a_subscriptions_plan_picker_offers_only_the_apis_plans(
    root_client: Client, world: dict[str, Any], bob_app: Consumer
) -> None:
    api = world["acme_api"]
    html = root_client.get(reverse("admin:apimgmt_subscription_add") + f"?api={api.pk}").content.decode()
    assert _options(html, "plan") == ["gold"]
    assert _options(html, "consumer") == ["bob-app"]
    assert "The plans orders offers; a subscription must choose one." in html
    html = root_client.get(reverse("admin:apimgmt_subscription_add")).content.decode()
    assert 'data-reload-with="api"' in html
    assert "Choose the API first" in html


def test_a_subscription_without_a_plan_is_refused_in_the_admin(
    root_client: Client, world: dict[str, Any], bob_app: Consumer
) -> None:
    url = reverse("admin:apimgmt_subscription_add")
    response = root_client.post(url, {"consumer": bob_app.pk, "api": world["acme_api"].pk, "plan": ""})
    assert response.status_code == 200
    assert "API &#x27;orders&#x27; is offered on plans gold: choose one of them." in response.content.decode()
    assert not Subscription.objects.exists()
    response = root_client.post(
        url, {"consumer": bob_app.pk, "api": world["acme_api"].pk, "plan": world["acme_plan"].pk}
    )
    assert response.status_code == 302
    assert Subscription.objects.get().plan == world["acme_plan"]


def test_policy_and_plan_labels_name_only_when_needed() -> None:
    assert str(Plan(name="gold")) == "gold"
    assert str(Policy(name="p", policy_type="quota")) == "p (quota)"
