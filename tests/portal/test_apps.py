"""Apps, subscriptions (automatic and manual approval), keys shown once, rotation and revocation."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from apimgmt import keys, services
from apimgmt.models import Api, ApiKey, Consumer, Plan, Subscription


def _new_key(client: Client, app: Consumer, name: str = "ci") -> tuple[str, bytes]:
    response = client.post(f"/portal/acme/apps/{app.pk}/keys/new/", {"name": name, "expires_in_days": ""})
    assert response.status_code == 200
    match = re.search(r'data-testid="new-key">([^<]+)</textarea>', response.content.decode())
    assert match, "no new key on the page"
    return match.group(1), response.content


def test_a_developer_creates_renames_and_deletes_an_app(bob_client: Client, bob: User) -> None:
    assert b"No apps yet" in bob_client.get("/portal/acme/apps/").content
    response = bob_client.post("/portal/acme/apps/new/", {"name": "  billing  ", "description": "Invoices"})
    app = Consumer.objects.get(name="billing")
    assert response["Location"] == f"/portal/acme/apps/{app.pk}/"
    assert app.owner == bob and app.tenant_id == "acme"

    duplicate = bob_client.post("/portal/acme/apps/new/", {"name": "billing"})
    assert duplicate.status_code == 400
    assert b"You already have an app with this name" in duplicate.content

    bob_client.post(f"/portal/acme/apps/{app.pk}/edit/", {"name": "billing-v2", "description": ""})
    app.refresh_from_db()
    assert app.name == "billing-v2"

    key, _ = services.api_key_create(consumer=app, actor=bob)
    confirm = bob_client.get(f"/portal/acme/apps/{app.pk}/delete/")
    assert b"revokes its 1 live key" in confirm.content
    assert bob_client.post(f"/portal/acme/apps/{app.pk}/delete/").status_code == 302
    assert not Consumer.objects.filter(pk=app.pk).exists()
    assert not ApiKey.objects.filter(pk=key.pk).exists() or not ApiKey.objects.get(pk=key.pk).active


def test_a_new_key_is_shown_once_and_never_again(
    bob_client: Client, bob_app: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    plaintext, page = _new_key(bob_client, bob_app)
    assert keys.is_well_formed(plaintext)
    assert b"you won't see this key again" in page
    assert b"Copy" in page
    stored = ApiKey.objects.get(consumer=bob_app)
    assert stored.key_hash == keys.hash_key(plaintext) and stored.key_prefix == plaintext[:12]
    later = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    assert plaintext[:12] in later and plaintext not in later
    assert plaintext not in caplog.text


def test_the_key_page_is_not_cached(bob_client: Client, bob_app: Consumer) -> None:
    response = bob_client.post(f"/portal/acme/apps/{bob_app.pk}/keys/new/", {"name": ""})
    assert "no-store" in response["Cache-Control"]


def test_rotation_keeps_the_old_key_valid_for_the_chosen_overlap(
    bob_client: Client, bob_app: Consumer, bob_key: tuple[ApiKey, str]
) -> None:
    old = bob_key[0]
    response = bob_client.post(f"/portal/acme/apps/{bob_app.pk}/keys/{old.pk}/rotate/", {"overlap_seconds": "86400"})
    assert response.status_code == 200
    assert b"you won't see this key again" in response.content and b"keeps working until" in response.content
    old.refresh_from_db()
    assert old.is_usable()
    assert abs((old.expires_at - (timezone.now() + timedelta(days=1))).total_seconds()) < 60
    new = ApiKey.objects.get(rotated_from=old)
    listing = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    assert listing.count("badge-ok") >= 2 and new.key_prefix in listing and old.key_prefix in listing


def test_rotation_rejects_an_overlap_that_is_not_offered(
    bob_client: Client, bob_app: Consumer, bob_key: tuple[ApiKey, str]
) -> None:
    old = bob_key[0]
    response = bob_client.post(f"/portal/acme/apps/{bob_app.pk}/keys/{old.pk}/rotate/", {"overlap_seconds": "99999999"})
    assert response.status_code == 400
    assert b"Select a valid choice" in response.content
    assert not ApiKey.objects.filter(rotated_from=old).exists()


def test_revoking_asks_first_then_revokes(bob_client: Client, bob_app: Consumer, bob_key: tuple[ApiKey, str]) -> None:
    key = bob_key[0]
    url = f"/portal/acme/apps/{bob_app.pk}/keys/{key.pk}/revoke/"
    assert b"can never be turned back on" in bob_client.get(url).content
    key.refresh_from_db()
    assert key.active
    assert bob_client.post(url).status_code == 302
    key.refresh_from_db()
    assert not key.active and key.revoked_at is not None
    assert b"Revoked" in bob_client.get(f"/portal/acme/apps/{bob_app.pk}/").content


def test_subscribing_on_an_automatic_plan_is_active_at_once(
    bob_client: Client, bob_app: Consumer, acme_api: Api, free_plan: Plan
) -> None:
    services.api_update(api=acme_api, plans=[free_plan], actor=None)
    response = bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk, "plan": free_plan.pk})
    assert response.status_code == 302
    assert Subscription.objects.get(consumer=bob_app, api=acme_api).status == "active"
    page = bob_client.get(response["Location"], follow=True).content
    assert b"Its keys work now" in page and b"Active" in page


def test_a_manual_plan_waits_for_an_admin_and_the_developer_sees_the_decision(
    bob_client: Client, bob_app: Consumer, acme_api: Api, gold_plan: Plan, alice: User
) -> None:
    services.api_update(api=acme_api, plans=[gold_plan], actor=None)
    bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk, "plan": gold_plan.pk})
    subscription = Subscription.objects.get(consumer=bob_app, api=acme_api)
    assert subscription.status == "pending"
    app_page = f"/portal/acme/apps/{bob_app.pk}/"
    assert b"Pending approval" in bob_client.get(app_page).content

    services.subscription_approve(subscription=subscription, actor=alice)
    page = bob_client.get(app_page).content
    assert b"Pending approval" not in page and b'badge-ok">Active' in page

    services.subscription_cancel(subscription=subscription, actor=alice)
    bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk, "plan": gold_plan.pk})
    again = Subscription.objects.get(consumer=bob_app, api=acme_api, status="pending")
    services.subscription_reject(subscription=again, actor=alice, note="Gold is for paying customers")
    page = bob_client.get(app_page).content
    assert b"Rejected" in page and b"Gold is for paying customers" in page


def test_subscribing_twice_explains_why_it_failed(bob_client: Client, bob_app: Consumer, acme_api: Api) -> None:
    bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk})
    again = bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk})
    assert again.status_code == 400
    assert b"already has a pending or active subscription" in again.content


def test_a_developer_cancels_a_subscription(bob_client: Client, bob_app: Consumer, acme_api: Api, bob: User) -> None:
    subscription = services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    bob_client.post(f"/portal/acme/apps/{bob_app.pk}/subscriptions/{subscription.pk}/cancel/")
    subscription.refresh_from_db()
    assert subscription.status == "cancelled"


def test_the_api_page_renders_docs_from_assets_served_here(bob_client: Client, acme_api_with_docs: Api) -> None:
    page = bob_client.get(f"/portal/acme/apis/{acme_api_with_docs.pk}/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower() and "unpkg" not in page and "jsdelivr" not in page
    document = bob_client.get(f"/portal/acme/apis/{acme_api_with_docs.pk}/openapi.json").json()
    assert document["paths"]["/users"]["get"]["summary"] == "List users"
    assert document["servers"] == [{"url": "http://testserver/api/users/v1"}]
