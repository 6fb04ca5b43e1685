"""The admin for events out: an endpoint's secret shown once on its own page, actions that rotate, replay, archive
plans and change subscriptions' plans through the same services as the API."""

from __future__ import annotations

import pytest
from django.test import Client

from apimgmt import services, webhooks
from apimgmt.models import AuditEvent, Plan, Subscription, WebhookDelivery, WebhookEndpoint


@pytest.fixture
def admin_client(client: Client, staff) -> Client:
    client.force_login(staff)
    return client


def test_adding_an_endpoint_shows_its_secret_once(admin_client, acme, receiver):
    r = admin_client.post(
        "/admin/apimgmt/webhookendpoint/add/",
        {"tenant": "acme", "url": receiver.url, "description": "billing", "event_types": ["key.revoked"]},
    )
    assert r.status_code == 200, r.content[:500]
    endpoint = WebhookEndpoint.objects.get()
    page = r.content.decode()
    assert endpoint.secret in page and "never displayed again" in page
    assert "no-store" in r["Cache-Control"]
    assert endpoint.event_types == ["key.revoked"]
    change = admin_client.get(f"/admin/apimgmt/webhookendpoint/{endpoint.pk}/change/").content.decode()
    assert endpoint.secret not in change


def test_a_private_url_is_a_form_error_in_the_admin(admin_client, acme, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    r = admin_client.post("/admin/apimgmt/webhookendpoint/add/", {"tenant": "acme", "url": "http://10.0.0.1/x"})
    assert r.status_code == 200 and "WEBHOOK_ALLOW_PRIVATE" in r.content.decode()
    assert not WebhookEndpoint.objects.exists()


def test_rotate_action_shows_the_new_secrets(admin_client, acme, alice, receiver):
    endpoint, old = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    r = admin_client.post(
        "/admin/apimgmt/webhookendpoint/", {"action": "rotate_secrets", "_selected_action": [endpoint.pk]}
    )
    endpoint.refresh_from_db()
    assert endpoint.secret != old and endpoint.secret in r.content.decode() and old not in r.content.decode()
    assert endpoint.previous_secret == old


def test_delivery_log_lists_attempts_and_replays(admin_client, acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    webhooks.Deliverer().run_once()
    delivery = WebhookDelivery.objects.get()
    page = admin_client.get("/admin/apimgmt/webhookdelivery/").content.decode()
    assert "consumer.blocked" in page and "succeeded" in page
    admin_client.post(
        "/admin/apimgmt/webhookdelivery/", {"action": "replay_deliveries", "_selected_action": [delivery.pk]}
    )
    assert WebhookDelivery.objects.filter(replay_of=delivery).count() == 1


def test_archive_action_and_change_plan_action(admin_client, acme, acme_api, bob_app, alice):
    old = services.plan_create(tenant=acme, name="old", actor=alice)
    new = services.plan_create(tenant=acme, name="new", actor=alice)
    services.api_update(api=acme_api, plans=[old, new], actor=alice)
    subscription = services.subscription_request(consumer=bob_app, api=acme_api, plan=old, actor=alice)
    admin_client.post("/admin/apimgmt/plan/", {"action": "archive_plans", "_selected_action": [old.pk]})
    assert Plan.objects.get(pk=old.pk).archived_at is not None
    # The intermediate page offers only unarchived plans of the tenant.
    page = admin_client.post(
        "/admin/apimgmt/subscription/",
        {"action": "change_subscription_plans", "_selected_action": [subscription.pk]},
    ).content.decode()
    assert f'value="{new.pk}"' in page and f'value="{old.pk}"' not in page
    r = admin_client.post(
        "/admin/apimgmt/subscription/",
        {
            "action": "change_subscription_plans",
            "_selected_action": [subscription.pk],
            "apply": "1",
            "plan": new.pk,
            "effective": "now",
        },
    )
    assert r.status_code == 302
    assert Subscription.objects.get(pk=subscription.pk).plan_id == new.pk
    assert AuditEvent.objects.filter(action="subscription.change_plan", object_id=subscription.pk).exists()
    # Nobody is on the archived plan any more: it can be deleted.
    services.plan_delete(plan=old, actor=alice)
