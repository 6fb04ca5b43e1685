"""/mgmt/v1/webhooks/ and /mgmt/v1/webhook-deliveries/: the secret shown once, address checks as 400s naming the
field, roles (admins manage, viewers read, developers see nothing), the delivery log and replays."""

from __future__ import annotations

import pytest

from apimgmt import services, webhooks
from apimgmt.models import AuditEvent, WebhookDelivery, WebhookEndpoint
from tests.support.webhook_receiver import verify

V1 = "/mgmt/v1"


def test_create_shows_the_secret_once_and_never_again(alice, client_for, receiver):
    c = client_for(alice)
    r = c.post(
        f"{V1}/webhooks/",
        {"tenant_id": "acme", "url": receiver.url, "event_types": ["key.revoked"], "description": "billing"},
        format="json",
    )
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["secret"].startswith("whsec_") and body["event_types"] == ["key.revoked"]
    assert body["status"] == "active" and body["id"].startswith("whk_")
    shown = c.get(f"{V1}/webhooks/{body['id']}/").json()
    listed = c.get(f"{V1}/webhooks/").json()
    assert "secret" not in shown and body["secret"] not in str(listed)
    assert body["secret"] not in str(AuditEvent.objects.values_list("changes", flat=True))


def test_rotating_the_secret_returns_the_new_one_and_the_overlap(alice, client_for, receiver):
    c = client_for(alice)
    created = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json").json()
    r = c.post(f"{V1}/webhooks/{created['id']}/rotate-secret/", {"overlap_seconds": 600}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["secret"] != created["secret"] and r.json()["previous_secret_expires_at"]
    bad = c.post(f"{V1}/webhooks/{created['id']}/rotate-secret/", {"overlap_seconds": "soon"}, format="json")
    assert bad.status_code == 400 and "overlap_seconds" in bad.json()["errors"]


def test_bad_urls_and_event_types_are_400s_naming_the_field(alice, client_for, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    c = client_for(alice)
    r = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": "http://127.0.0.1:9/x"}, format="json")
    assert r.status_code == 400
    assert "WEBHOOK_ALLOW_PRIVATE" in r.json()["errors"]["url"][0]
    r = c.post(
        f"{V1}/webhooks/",
        {"tenant_id": "acme", "url": "https://93.184.215.14/x", "event_types": ["key.exploded"]},
        format="json",
    )
    assert r.status_code == 400 and r.json()["errors"] == {"event_types.0": ['"key.exploded" is not a valid choice.']}
    assert not WebhookEndpoint.objects.exists()


def test_patch_changes_url_and_filter_through_the_same_checks(alice, client_for, receiver, settings):
    c = client_for(alice)
    created = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json").json()
    r = c.patch(f"{V1}/webhooks/{created['id']}/", {"event_types": ["consumer.blocked"]}, format="json")
    assert r.status_code == 200 and r.json()["event_types"] == ["consumer.blocked"]
    settings.WEBHOOK_ALLOW_PRIVATE = False
    r = c.patch(f"{V1}/webhooks/{created['id']}/", {"url": "http://10.1.2.3/x"}, format="json")
    assert r.status_code == 400 and "url" in r.json()["errors"]
    assert WebhookEndpoint.objects.get().url == receiver.url


@pytest.mark.parametrize("who", ["bob", "vera"])
def test_developers_and_viewers_cannot_manage_webhooks(who, request, alice, client_for, receiver):
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=alice.memberships.get().tenant, url=receiver.url, actor=alice)
    user = request.getfixturevalue(who)
    c = client_for(user)
    r = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json")
    assert r.status_code == 403
    r = c.post(f"{V1}/webhooks/{endpoint.pk}/disable/", {}, format="json")
    listed = c.get(f"{V1}/webhooks/").json()
    if who == "vera":  # viewers read the configuration (never a secret) but change nothing
        assert r.status_code == 403 and listed["count"] == 1
    else:  # developers do not see the tenant's integrations at all
        assert r.status_code == 404 and listed["count"] == 0
    assert WebhookEndpoint.objects.get().status == "active"


def test_delivery_log_and_replay_through_the_api(alice, bob_app, client_for, receiver):
    c = client_for(alice)
    created = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json").json()
    services.consumer_block(consumer=bob_app, actor=alice)
    deliverer = webhooks.Deliverer()
    deliverer.run_once()
    log = c.get(f"{V1}/webhooks/{created['id']}/deliveries/").json()
    assert log["count"] == 1
    entry = log["results"][0]
    assert entry["event_type"] == "consumer.blocked" and entry["status"] == "succeeded"
    assert entry["attempts"] == 1 and entry["response_code"] == 200 and entry["latency_ms"] > 0
    assert c.get(f"{V1}/webhook-deliveries/?status=succeeded").json()["count"] == 1
    r = c.post(f"{V1}/webhook-deliveries/{entry['id']}/replay/", {}, format="json")
    assert r.status_code == 201 and r.json()["replay_of"] == entry["id"] and r.json()["status"] == "pending"
    deliverer.run_once()
    deliverer.close()
    assert len(receiver.received) == 2
    assert all(verify(created["secret"], got.headers, got.body) for got in receiver.received)
    assert WebhookDelivery.objects.filter(status="succeeded").count() == 2


def test_a_disabled_endpoint_is_enabled_again_and_replay_waits_for_it(alice, bob_app, client_for, receiver):
    c = client_for(alice)
    created = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json").json()
    services.consumer_block(consumer=bob_app, actor=alice)
    webhooks.Deliverer().run_once()
    assert c.post(f"{V1}/webhooks/{created['id']}/disable/", {}, format="json").json()["status"] == "disabled"
    delivery_id = WebhookDelivery.objects.get().pk
    r = c.post(f"{V1}/webhook-deliveries/{delivery_id}/replay/", {}, format="json")
    assert r.status_code == 400 and "disabled" in r.json()["errors"]["endpoint_id"][0]
    r = c.post(f"{V1}/webhooks/{created['id']}/enable/", {}, format="json")
    assert r.json()["status"] == "active" and r.json()["failing_since"] is None


def test_delete_removes_the_endpoint_and_its_log(alice, client_for, receiver):
    c = client_for(alice)
    created = c.post(f"{V1}/webhooks/", {"tenant_id": "acme", "url": receiver.url}, format="json").json()
    assert c.delete(f"{V1}/webhooks/{created['id']}/").status_code == 204
    assert not WebhookEndpoint.objects.exists()
    assert AuditEvent.objects.filter(action="webhook.delete", object_id=created["id"]).exists()
