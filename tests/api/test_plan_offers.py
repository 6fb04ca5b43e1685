"""Management API: an API lists the plans it offers (`plans`), and subscriptions must choose one of them."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.models import Api, Consumer, Plan, Subscription

pytestmark = pytest.mark.django_db


def test_api_resource_lists_and_changes_its_offered_plans(
    alice: User, acme_api: Api, acme_plan: Plan, client_for: Any
) -> None:
    c = client_for(alice)
    assert c.get(f"/mgmt/v1/apis/{acme_api.pk}/").json()["plans"] == []
    r = c.patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"plans": [acme_plan.pk]}, format="json")
    assert r.status_code == 200 and r.json()["plans"] == [acme_plan.pk]
    r = c.patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"plans": ["pln_nope"]}, format="json")
    assert r.status_code == 400
    assert r.json()["errors"]["plans"] == ["Unknown plans for this tenant: pln_nope."]
    assert list(acme_api.plans.all()) == [acme_plan]


def test_subscribing_without_a_plan_to_an_api_that_offers_plans_is_400(
    alice: User, acme_api: Api, acme_plan: Plan, bob_app: Consumer, client_for: Any
) -> None:
    c = client_for(alice)
    c.patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"plans": [acme_plan.pk]}, format="json")
    r = c.post("/mgmt/v1/subscriptions/", {"consumer_id": bob_app.pk, "api_id": acme_api.pk}, format="json")
    assert r.status_code == 400
    assert r["Content-Type"] == "application/problem+json"
    assert r.json()["errors"]["plan_id"] == ["API 'users' is offered on plans gold: choose one of them."]
    assert not Subscription.objects.exists()
    r = c.post(
        "/mgmt/v1/subscriptions/",
        {"consumer_id": bob_app.pk, "api_id": acme_api.pk, "plan_id": acme_plan.pk},
        format="json",
    )
    assert r.status_code == 201 and r.json()["status"] == "active"


def test_developers_see_which_plans_an_api_offers(bob: User, acme_api: Api, acme_plan: Plan, client_for: Any) -> None:
    from apimgmt import services

    services.api_update(api=acme_api, plans=[acme_plan], actor=None)
    entry = client_for(bob).get(f"/mgmt/v1/apis/{acme_api.pk}/").json()
    assert entry["plans"] == [acme_plan.pk]
    assert "upstream_url" not in entry  # still the catalog entry, not the full API
