"""What the deliverer keeps and when it gives up: events that carry a dedupe key outlive the window that key is
decided in (else the notice is sent again), and a failing delivery is given up after about a day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone

from apimgmt import events, services, webhooks
from apimgmt.models import Consumer, Event, Tenant, WebhookDelivery
from tests.support.quotas import quota_window, subscribed_on_quota
from tests.support.webhook_receiver import Receiver


def _monthly_quota_at_80_percent(acme: Tenant, bob_app: Consumer, redis_client: Any, month: datetime) -> None:
    quota, _ = subscribed_on_quota(acme, bob_app, {"requests_per_month": 10})
    window = quota_window(quota, bob_app.pk, month.timestamp())
    redis_client.set(window.key, 8, ex=3600)


def test_a_monthly_quota_notice_sent_on_the_first_is_not_sent_again_on_the_31st(acme, bob_app, redis_client):
    first = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    thirty_first = datetime(2026, 12, 31, 12, 0, tzinfo=UTC)
    _monthly_quota_at_80_percent(acme, bob_app, redis_client, first)
    assert events.quota_threshold_notices(client=redis_client, now=first) == 1
    Event.objects.filter(event_type="quota.threshold").update(occurred_at=first)
    webhooks.dispatch_events()

    webhooks.forget_old(now=thirty_first)  # 30 days and 2 hours later: past EVENT_RETENTION_DAYS
    assert events.quota_threshold_notices(client=redis_client, now=thirty_first) == 0
    assert Event.objects.filter(event_type="quota.threshold").count() == 1
    # Once the month is certainly over, the notice goes like any other event.
    webhooks.forget_old(now=first + timedelta(days=webhooks.DEDUPE_RETENTION_DAYS, hours=1))
    assert not Event.objects.filter(event_type="quota.threshold").exists()


def test_a_short_retention_keeps_expiry_notices_until_their_key_expired(acme, alice, bob_app, settings):
    settings.EVENT_RETENTION_DAYS = 3
    key, _plaintext = services.api_key_create(
        consumer=bob_app, name="short", actor=alice, expires_at=timezone.now() + timedelta(days=6)
    )
    assert events.key_expiring_notices() == 1
    webhooks.dispatch_events()
    four_days_later = timezone.now() + timedelta(days=4)
    plain = Event.objects.filter(dedupe_key__isnull=True).count()  # key.created and the like
    # Events without a dedupe key go after 3 days; the 7-day notice stays while it may be decided again.
    assert plain and webhooks.forget_old(now=four_days_later) == (0, plain)
    assert list(Event.objects.values_list("event_type", flat=True)) == ["key.expiring"]
    assert events.key_expiring_notices(now=four_days_later) == 0
    assert key.expires_at is not None


def test_a_delivery_failing_with_the_default_settings_is_given_up_after_about_a_day(
    acme, alice, bob_app, receiver: Receiver
):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    webhooks.dispatch_events()
    delivery = WebhookDelivery.objects.get()
    created = delivery.created_at
    failure = webhooks.AttemptResult(False, 503, 12.0, "HTTP 503")
    moment = created
    stats = webhooks.DeliveryStats()
    while True:
        webhooks.record(delivery, failure, stats, now=moment)
        delivery.refresh_from_db()
        if delivery.status != WebhookDelivery.Status.PENDING:
            break
        assert delivery.next_attempt_at is not None
        moment = delivery.next_attempt_at
    assert delivery.status == WebhookDelivery.Status.FAILED
    assert delivery.completed_at == moment
    # Retried until the next attempt would fall after 24 h (about 21 attempts): the last one at most one capped
    # delay (3 h) before.
    given_up_after = (moment - created).total_seconds() / 3600
    assert 24 - 3 <= given_up_after <= 24, given_up_after
    assert 17 <= delivery.attempts <= 26 and stats.failed == 1 and stats.retried == delivery.attempts - 1
