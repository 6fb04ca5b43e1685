"""Reads and defaults written once (apimgmt.models): live keys, the public catalog, open subscriptions, and the
default overlap of a key rotation, the same from the admin, the portal, the management API and the services."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from apimgmt import selectors, services
from apimgmt.models import DEFAULT_ROTATION_OVERLAP_SECONDS, Api, ApiKey, Consumer, Subscription, Tenant
from apimgmt.tokens import api_token_create


def _api(tenant: Tenant, name: str, *, status: str, visibility: str = Api.Visibility.PUBLIC) -> Api:
    return services.api_create(
        tenant=tenant,
        api_name=name,
        base_path=f"/{name}",
        upstream_url=f"https://{name}.example.com",
        status=status,
        visibility=visibility,
        actor=None,
    )


def test_live_keys_are_the_unrevoked_unexpired_ones(bob_app: Consumer) -> None:
    live, _ = services.api_key_create(consumer=bob_app, name="live", actor=None)
    expiring, _ = services.api_key_create(
        consumer=bob_app, name="expiring", expires_at=timezone.now() + timedelta(days=1), actor=None
    )
    revoked, _ = services.api_key_create(consumer=bob_app, name="revoked", actor=None)
    services.api_key_revoke(key=revoked, actor=None)
    expired, _ = services.api_key_create(
        consumer=bob_app, name="expired", expires_at=timezone.now() + timedelta(seconds=30), actor=None
    )
    later = timezone.now() + timedelta(minutes=1)

    assert set(bob_app.keys.live()) == {live, expiring, expired}
    assert set(bob_app.keys.live(later)) == {live, expiring}
    assert {key for key in ApiKey.objects.filter(consumer=bob_app) if key.is_usable(later)} == {live, expiring}


def test_one_public_catalog_for_the_portal_and_for_developers_in_the_management_api(acme: Tenant, bob: User) -> None:
    listed = {
        _api(acme, "active", status="active"),
        _api(acme, "deprecated", status="active"),
    }
    services.api_deprecate(api=next(api for api in listed if api.api_name == "deprecated"), actor=None)
    _api(acme, "draft", status="draft")
    _api(acme, "private", status="active", visibility=Api.Visibility.PRIVATE)
    retired = _api(acme, "retired", status="active")
    services.api_retire(api=retired, actor=None)

    assert set(Api.objects.public_catalog()) == listed
    assert set(selectors.portal_catalog(acme)) == listed
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_create(user=bob, actor=None)[1]}")
    response = client.get("/mgmt/v1/apis/")
    assert response.status_code == 200
    assert {row["id"] for row in response.json()["results"]} == {api.pk for api in listed}
    assert set(Api.objects.routable()) == listed | set(Api.objects.filter(api_name="private"))


def test_open_subscriptions_are_pending_or_active_and_one_per_api(acme: Tenant, bob_app: Consumer) -> None:
    active, cancelled = (_api(acme, name, status="active") for name in ("active", "cancelled"))
    pending, rejected = (
        services.api_create(
            tenant=acme,
            api_name=name,
            base_path=f"/{name}",
            upstream_url=f"https://{name}.example.com",
            status="active",
            subscription_approval=Api.Approval.MANUAL,
            actor=None,
        )
        for name in ("pending", "rejected")
    )
    subscribed = {
        api.api_name: services.subscription_request(consumer=bob_app, api=api, actor=None)
        for api in (active, cancelled, pending, rejected)
    }
    services.subscription_cancel(subscription=subscribed["cancelled"], actor=None)
    services.subscription_reject(subscription=subscribed["rejected"], actor=None)

    assert set(Subscription.objects.open()) == {subscribed["active"], subscribed["pending"]}
    # A closed subscription frees the consumer's place on the API; an open one holds it.
    services.subscription_request(consumer=bob_app, api=cancelled, actor=None)
    services.subscription_request(consumer=bob_app, api=rejected, actor=None)
    for api in (active, pending):
        with pytest.raises(ValidationError, match="already has a pending or active subscription"):
            services.subscription_request(consumer=bob_app, api=api, actor=None)


def _expires_in(key: ApiKey, since: datetime) -> float:
    key.refresh_from_db()
    assert key.expires_at is not None
    return (key.expires_at - since).total_seconds()


def test_the_default_rotation_overlap_is_the_same_everywhere(
    staff: User, bob: User, bob_app: Consumer, acme_api: Api
) -> None:
    keys = [services.api_key_create(consumer=bob_app, name=f"k{i}", actor=None)[0] for i in range(3)]
    started = timezone.now()

    services.api_key_rotate(key=keys[0], actor=None)

    admin = Client()
    admin.force_login(staff)
    changelist = reverse("admin:apimgmt_apikey_changelist")
    assert admin.post(changelist, {"action": "rotate_keys", "_selected_action": [keys[1].pk]}).status_code == 200

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {api_token_create(user=staff, actor=None)[1]}")
    assert api.post(f"/mgmt/v1/keys/{keys[2].pk}/rotate/", {}, format="json").status_code in (200, 201)

    for key in keys:
        assert (
            DEFAULT_ROTATION_OVERLAP_SECONDS - 1 <= _expires_in(key, started) <= DEFAULT_ROTATION_OVERLAP_SECONDS + 60
        )

    portal = Client()
    portal.force_login(bob)
    successor = keys[0].successors.get()
    page = portal.get(f"/portal/acme/apps/{bob_app.pk}/keys/{successor.pk}/rotate/").content.decode()
    preselected = re.search(r'<input[^>]*name="overlap_seconds"[^>]*value="(\d+)"[^>]*checked', page)
    assert preselected, "the portal preselects no overlap"
    assert int(preselected.group(1)) == DEFAULT_ROTATION_OVERLAP_SECONDS
