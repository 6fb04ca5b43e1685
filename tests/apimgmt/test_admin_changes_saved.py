"""An edit saved in the admin reaches the database, audited, through the services.

(The form used to edit the object in memory before the update service compared it with itself: no change
found, nothing saved, and the admin still said "changed successfully".)"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.models import Api, AuditEvent, Consumer, Plan, Policy, Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(client: Client, staff: User) -> Client:
    client.force_login(staff)
    return client


def _audited(action: str, pk: str) -> dict[str, list[object]]:
    return AuditEvent.objects.filter(action=action, object_id=pk).latest("id").changes


def test_a_plan_renamed_in_the_admin_is_saved(root: Client, acme: Tenant) -> None:
    plan = services.plan_create(tenant=acme, name="gold", actor=None)
    url = reverse("admin:apimgmt_plan_change", args=[plan.pk])
    response = root.post(url, {"tenant": "acme", "name": "platinum", "description": "", "approval": "manual"})
    assert response.status_code == 302
    plan.refresh_from_db()
    assert (plan.name, plan.approval) == ("platinum", "manual")
    assert _audited("plan.update", plan.pk)["name"] == ["gold", "platinum"]


def test_a_policy_edited_in_the_admin_is_saved(root: Client, acme: Tenant) -> None:
    policy = services.policy_create(
        tenant=acme, name="p", policy_type="quota", config={"requests_per_day": 5}, actor=None
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    response = root.post(
        url,
        {
            "name": "p2",
            "description": "",
            "mode": "shadow",
            "on_store_error": "open",
            "config": "",
            "quota_requests_per_day": 7,
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    policy.refresh_from_db()
    assert (policy.name, policy.mode, policy.config["requests_per_day"]) == ("p2", "shadow", 7)


def test_an_api_edited_in_the_admin_is_saved(root: Client, acme_api: Api) -> None:
    url = reverse("admin:apimgmt_api_change", args=[acme_api.pk])
    form = root.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields if form[name].value() is not None}
    data.update({"upstream_url": "https://users-v2.example.com", "targets-TOTAL_FORMS": 0, "targets-INITIAL_FORMS": 0})
    data = {k: ("on" if v is True else v) for k, v in data.items() if v is not False}
    response = root.post(url, data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    acme_api.refresh_from_db()
    assert acme_api.upstream_url == "https://users-v2.example.com"
    assert _audited("api.update", acme_api.pk)["upstream_url"][1] == "https://users-v2.example.com"


def test_an_app_renamed_in_the_admin_is_saved(root: Client, bob_app: Consumer, bob: User) -> None:
    url = reverse("admin:apimgmt_consumer_change", args=[bob_app.pk])
    inlines = {
        "keys-TOTAL_FORMS": 0,
        "keys-INITIAL_FORMS": 0,
        "identities-TOTAL_FORMS": 0,
        "identities-INITIAL_FORMS": 0,
    }
    response = root.post(url, {"name": "billing", "description": "", "owner": bob.pk, **inlines})
    assert response.status_code == 302, response.content.decode()[-2000:]
    bob_app.refresh_from_db()
    assert bob_app.name == "billing"


def test_a_tenant_renamed_in_the_admin_is_saved(root: Client, acme: Tenant) -> None:
    url = reverse("admin:apimgmt_tenant_change", args=["acme"])
    response = root.post(
        url,
        {
            "name": "Acme Corporation",
            "timezone": "Europe/Berlin",
            "memberships-TOTAL_FORMS": 0,
            "memberships-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    acme.refresh_from_db()
    assert (acme.name, acme.timezone) == ("Acme Corporation", "Europe/Berlin")


def test_nothing_else_is_written_when_nothing_changed(root: Client, acme: Tenant) -> None:
    plan = services.plan_create(tenant=acme, name="gold", actor=None)
    before = AuditEvent.objects.count()
    url = reverse("admin:apimgmt_plan_change", args=[plan.pk])
    root.post(url, {"tenant": "acme", "name": "gold", "description": "", "approval": "auto"})
    assert AuditEvent.objects.count() == before
    assert Plan.objects.get(pk=plan.pk).name == "gold" and Policy.objects.count() == 0


def test_the_openapi_box_of_a_new_api_is_empty_not_null(root: Client, acme_api: Api) -> None:
    import re

    page = root.get(reverse("admin:apimgmt_api_add")).content.decode()
    box = re.search(r'<textarea name="openapi_spec"[^>]*>(.*?)</textarea>', page, re.S)
    assert box and box.group(1).strip() == ""
    services.api_update(api=acme_api, openapi_spec={"openapi": "3.0.3"}, actor=None)
    page = root.get(reverse("admin:apimgmt_api_change", args=[acme_api.pk])).content.decode()
    box = re.search(r'<textarea name="openapi_spec"[^>]*>(.*?)</textarea>', page, re.S)
    assert box and "3.0.3" in box.group(1)
