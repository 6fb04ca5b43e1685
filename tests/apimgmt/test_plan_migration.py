"""Migration 0002: each API comes to offer the plans its existing subscriptions already use; none is changed."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps as django_apps

from apimgmt import services
from apimgmt.models import Api, Consumer, Plan, Subscription, Tenant

pytestmark = pytest.mark.django_db

migration = importlib.import_module("apimgmt.migrations.0002_api_plans_and_app_names_per_owner")


def test_apis_offer_the_plans_their_subscriptions_use_and_no_subscription_changes(
    acme: Tenant, acme_api: Api, bob_app: Consumer
) -> None:
    gold = services.plan_create(tenant=acme, name="gold", actor=None)
    services.plan_create(tenant=acme, name="unused", actor=None)
    on_gold = services.subscription_request(consumer=bob_app, api=acme_api, plan=gold, actor=None)
    services.subscription_cancel(subscription=on_gold, actor=None)
    without = services.subscription_request(consumer=bob_app, api=acme_api, actor=None)
    other = services.api_create(
        tenant=acme, api_name="o", base_path="/o", upstream_url="https://o.example.com", status="active", actor=None
    )
    acme_api.plans.clear()  # as before the migration
    before = sorted(Subscription.objects.values_list("id", "plan_id", "status"))

    migration.link_plans_in_use(django_apps, None)
    migration.link_plans_in_use(django_apps, None)  # twice: no duplicate links

    assert list(acme_api.plans.all()) == [gold]
    assert not other.plans.exists()
    assert sorted(Subscription.objects.values_list("id", "plan_id", "status")) == before
    without.refresh_from_db()
    assert (without.plan, without.status) == (None, "active")
    assert Plan.objects.count() == 2
