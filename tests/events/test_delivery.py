"""Webhook delivery against real receivers on loopback: Standard Webhooks signatures, retries with backoff, giving
up, disabling a failing endpoint, replays, event-type filters and the address checks."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.core import mail
from django.core.exceptions import ValidationError
from django.utils import timezone

from apimgmt import services, webhooks
from apimgmt.models import AuditEvent, Event, WebhookDelivery, WebhookEndpoint
from tests.support.webhook_receiver import Receiver, verify


def _run_until(condition, *, timeout: float = 20.0) -> webhooks.DeliveryStats:
    deliverer = webhooks.Deliverer(batch_size=50, concurrency=4)
    total = webhooks.DeliveryStats()
    deadline = time.monotonic() + timeout
    try:
        while True:
            total.add(deliverer.run_once())
            if condition():
                return total
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.02)
    finally:
        deliverer.close()


def test_a_standard_webhooks_receiver_verifies_every_delivery(acme, alice, bob_key, receiver: Receiver):
    endpoint, secret = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    key, _ = bob_key
    services.api_key_revoke(key=key, actor=alice)
    _run_until(lambda: len(receiver.received) == 1)
    got = receiver.received[0]
    assert verify(secret, got.headers, got.body)
    assert not verify(secret, got.headers, got.body + b" ")  # the body is what is signed
    assert not verify(webhooks.generate_secret(), got.headers, got.body)
    payload = got.payload
    assert payload["type"] == "key.revoked" and payload["data"]["key_id"] == key.pk
    assert got.headers["webhook-id"] == payload["id"]  # receivers deduplicate by it
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("succeeded", 1, 200)
    assert delivery.latency_ms is not None and delivery.latency_ms > 0


def test_during_a_rotation_overlap_both_secrets_verify_then_only_the_new_one(acme, alice, bob_app, receiver):
    endpoint, old_secret = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    endpoint, new_secret = webhooks.webhook_endpoint_rotate_secret(endpoint=endpoint, actor=alice, overlap_seconds=3600)
    assert new_secret != old_secret
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: len(receiver.received) == 1)
    first = receiver.received[0]
    assert verify(old_secret, first.headers, first.body) and verify(new_secret, first.headers, first.body)
    webhooks.webhook_endpoint_rotate_secret(endpoint=endpoint, actor=alice, overlap_seconds=0)
    newest = WebhookEndpoint.objects.get(pk=endpoint.pk).secret
    services.consumer_unblock(consumer=bob_app, actor=alice)
    _run_until(lambda: len(receiver.received) == 2)
    second = receiver.received[1]
    assert verify(newest, second.headers, second.body)
    assert not verify(new_secret, second.headers, second.body) and not verify(old_secret, second.headers, second.body)


def test_a_receiver_failing_three_times_gets_the_backoff_schedule_then_one_success(
    acme, alice, bob_app, receiver, settings
):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 0.4
    receiver.status_for = lambda n: 503 if n < 3 else 204
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    stats = _run_until(lambda: WebhookDelivery.objects.filter(status="succeeded").exists())
    assert len(receiver.received) == 4
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1  # one event, retried
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):
        nominal = 0.4 * 2 ** (n - 1)  # 0.4, 0.8, 1.6 s, each times a jitter in [0.5, 1]
        assert nominal * 0.5 - 0.05 <= gap <= nominal + 1.0, (n, gaps)
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("succeeded", 4, 204)
    assert WebhookDelivery.objects.count() == 1
    assert (stats.retried, stats.succeeded, stats.failed) == (3, 1, 0)
    assert WebhookEndpoint.objects.get(pk=endpoint.pk).failing_since is None


def test_retry_delays_grow_exponentially_with_jitter_and_are_capped(settings):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 5.0
    settings.WEBHOOK_RETRY_MAX_DELAY_SECONDS = 3 * 3600.0
    import random

    rng = random.Random(7)
    for attempts, nominal in [(1, 5), (2, 10), (5, 80), (12, 10240), (13, 10800), (40, 10800)]:
        delays = [webhooks.retry_delay(attempts, rng=rng) for _ in range(50)]
        assert all(nominal * 0.5 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal * 0.1  # jittered, not all equal
    # With the defaults the schedule spans about a day before a delivery is given up.
    total, attempts = 0.0, 0
    while total < 24 * 3600:
        attempts += 1
        total += min(5.0 * 2 ** (attempts - 1), 3 * 3600.0)
    assert 15 <= attempts <= 20


@pytest.mark.django_db(transaction=True)
def test_an_endpoint_failing_for_the_disable_period_is_disabled_and_its_admins_told(
    acme, alice, bob_app, receiver, settings
):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 0.1
    settings.WEBHOOK_RETRY_WINDOW_SECONDS = 30
    settings.WEBHOOK_DISABLE_AFTER_SECONDS = 0.5
    receiver.status_for = lambda n: 500
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: WebhookEndpoint.objects.get(pk=endpoint.pk).status == "disabled")
    endpoint.refresh_from_db()
    assert "every delivery failed since" in endpoint.disabled_reason
    assert AuditEvent.objects.filter(action="webhook.disable", object_id=endpoint.pk).exists()
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    assert endpoint.url in mail.outbox[0].subject
    # A disabled endpoint gets nothing more: new events are not queued for it.
    before = len(receiver.received)
    services.consumer_unblock(consumer=bob_app, actor=alice)
    webhooks.Deliverer().run_once()
    assert len(receiver.received) == before
    assert WebhookDelivery.objects.filter(endpoint=endpoint).count() == 1


def test_a_delivery_exhausting_its_window_is_marked_failed(acme, alice, bob_app, receiver, settings):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 0.1
    settings.WEBHOOK_RETRY_WINDOW_SECONDS = 0.5
    receiver.status_for = lambda n: 500
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: WebhookDelivery.objects.filter(status="failed").exists())
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.attempts >= 2 and delivery.response_code == 500 and delivery.last_error == "HTTP 500"
    assert WebhookEndpoint.objects.get(pk=endpoint.pk).status == "active"  # 3 days of failure by default


def test_replay_sends_the_same_event_again_as_a_new_delivery(acme, alice, bob_app, receiver):
    endpoint, secret = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: len(receiver.received) == 1)
    original = WebhookDelivery.objects.get(endpoint=endpoint)
    replay = webhooks.webhook_delivery_replay(delivery=original, actor=alice)
    _run_until(lambda: len(receiver.received) == 2)
    assert receiver.received[0].headers["webhook-id"] == receiver.received[1].headers["webhook-id"]
    assert verify(secret, receiver.received[1].headers, receiver.received[1].body)
    replay.refresh_from_db()
    assert (replay.status, replay.replay_of_id) == ("succeeded", original.pk)


def test_an_endpoint_gets_only_the_event_types_it_asked_for(acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice, event_types=["consumer.unblocked"])
    services.consumer_block(consumer=bob_app, actor=alice)
    services.consumer_unblock(consumer=bob_app, actor=alice)
    _run_until(lambda: len(receiver.received) >= 1)
    webhooks.Deliverer().run_once()
    assert [r.payload["type"] for r in receiver.received] == ["consumer.unblocked"]


def test_another_tenants_events_never_reach_an_endpoint(acme, globex, alice, carol, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    other = services.consumer_create(tenant=globex, name="g", actor=carol)
    services.consumer_block(consumer=other, actor=carol)
    stats = _run_until(lambda: True)
    assert stats.dispatched == 1 and receiver.received == []


def test_private_webhook_urls_are_refused_unless_allowed(acme, alice, settings, receiver):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    for url in (receiver.url, "http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://localhost:9/x"):
        with pytest.raises(ValidationError) as caught:
            webhooks.webhook_endpoint_create(tenant=acme, url=url, actor=alice)
        message = caught.value.message_dict["url"][0]
        assert "loopback, private, link-local or metadata address" in message and "WEBHOOK_ALLOW_PRIVATE" in message
    with pytest.raises(ValidationError, match="must start with http"):
        webhooks.webhook_endpoint_create(tenant=acme, url="ftp://example.com/x", actor=alice)
    assert not WebhookEndpoint.objects.exists()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    assert endpoint.url == receiver.url


def test_a_private_address_is_never_contacted_once_no_longer_allowed(acme, alice, bob_app, receiver, settings):
    endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    settings.WEBHOOK_ALLOW_PRIVATE = False
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: WebhookDelivery.objects.filter(attempts__gte=1).exists())
    assert receiver.received == []
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.response_code is None and "may not reach" in delivery.last_error


def test_two_deliverers_send_each_delivery_once(acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    for n in range(10):
        services.api_key_create(consumer=bob_app, name=f"k{n}", actor=alice)
    webhooks.dispatch_events()
    first = webhooks.claim_due(batch_size=6)
    second = webhooks.claim_due(batch_size=100)
    assert len(first) == 6 and len(second) == 4
    assert not {d.pk for d in first} & {d.pk for d in second}
    assert webhooks.claim_due(batch_size=100) == []  # leased: nobody takes them again before the lease ends


def test_a_claim_whose_deliverer_died_is_taken_again_after_its_lease(acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    webhooks.dispatch_events()
    assert len(webhooks.claim_due(batch_size=10, lease=timedelta(seconds=0.2))) == 1  # ... and the process dies
    time.sleep(0.3)
    _run_until(lambda: len(receiver.received) == 1)
    assert WebhookDelivery.objects.get().status == "succeeded"


def test_envelope_is_compact_json_with_id_type_timestamp_and_data(acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    _run_until(lambda: len(receiver.received) == 1)
    body = receiver.received[0].body
    payload = json.loads(body)
    assert set(payload) == {"id", "type", "timestamp", "tenant_id", "data"}
    assert payload["data"] == {"consumer_id": bob_app.pk, "name": "bob-app", "status": "blocked"}
    assert payload["timestamp"].endswith("Z") and timezone.now().isoformat()[:4] == payload["timestamp"][:4]
    assert receiver.received[0].headers["content-type"] == "application/json"


def test_old_events_and_finished_deliveries_are_forgotten_but_pending_ones_stay(acme, alice, bob_app, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    services.consumer_unblock(consumer=bob_app, actor=alice)
    webhooks.dispatch_events()
    done, waiting = WebhookDelivery.objects.order_by("id")
    done.status = "succeeded"
    done.save()
    later = timezone.now() + timedelta(days=31)
    assert webhooks.forget_old(now=later) == (1, 1)
    assert list(WebhookDelivery.objects.values_list("pk", flat=True)) == [waiting.pk]
    assert list(Event.objects.values_list("pk", flat=True)) == [waiting.event_id]
    assert webhooks.forget_old(now=timezone.now()) == (0, 0)  # nothing is 30 days old yet
