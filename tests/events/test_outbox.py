"""The outbox: every event row commits (or rolls back) with the change that causes it, and each service emits its
catalogue event with the object's fields (never a key or its hash)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.utils import timezone

from apimgmt import events, services
from apimgmt.models import ApiKey, Event
from tests.events.conftest import event_types


def _count_from_another_connection(event_type: str) -> tuple[int, int]:
    """(events of this type, revoked keys) as a second database session sees them: only committed rows."""
    params = connection.get_connection_params()
    dsn = {k: v for k, v in params.items() if k in ("host", "port", "user", "password", "dbname")}
    with psycopg.connect(**dsn, autocommit=True) as other:
        events_seen = other.execute("SELECT count(*) FROM am_events WHERE event_type = %s", [event_type]).fetchone()
        keys_seen = other.execute("SELECT count(*) FROM am_api_keys WHERE revoked_at IS NOT NULL").fetchone()
    assert events_seen is not None and keys_seen is not None
    return events_seen[0], keys_seen[0]


@pytest.mark.django_db(transaction=True)
def test_event_and_change_become_visible_together_at_commit(bob_key, bob):
    key, _ = bob_key
    with transaction.atomic():
        services.api_key_revoke(key=key, actor=bob)
        assert Event.objects.filter(event_type="key.revoked").count() == 1  # inside: both written
        assert _count_from_another_connection("key.revoked") == (0, 0)  # outside: neither yet
    assert _count_from_another_connection("key.revoked") == (1, 1)


@pytest.mark.django_db(transaction=True)
def test_failure_after_the_change_but_before_commit_leaves_neither(bob_key, bob):
    key, _ = bob_key

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        services.api_key_revoke(key=key, actor=bob)
        raise Boom  # e.g. the next statement of the same request fails
    assert _count_from_another_connection("key.revoked") == (0, 0)
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert not Event.objects.filter(event_type="key.revoked").exists()


def test_key_events_carry_the_key_fields_but_never_the_key(bob_app, bob):
    key, plaintext = services.api_key_create(consumer=bob_app, name="ci", actor=bob)
    successor, _ = services.api_key_rotate(key=key, actor=bob, overlap_seconds=60)
    services.api_key_revoke(key=successor, actor=bob)
    rows = list(Event.objects.filter(tenant_id="acme", event_type__startswith="key.").order_by("occurred_at", "id"))
    assert [e.event_type for e in rows] == ["key.created", "key.rotated", "key.created", "key.revoked"]
    assert rows[0].data["key_id"] == key.pk and rows[0].data["key_prefix"] == key.key_prefix
    assert rows[1].data["successor_key_id"] == successor.pk
    assert rows[2].data["rotated_from"] == key.pk
    assert rows[3].data["revoked_at"] is not None
    for row in rows:
        text = str(row.data)
        assert plaintext not in text and key.key_hash not in text and successor.key_hash not in text


def test_subscription_consumer_and_api_lifecycle_events(acme, acme_api, bob_app, alice):
    manual = services.plan_create(tenant=acme, name="gold", approval="manual", actor=alice)
    services.api_update(api=acme_api, plans=[manual], actor=alice)
    first = services.subscription_request(consumer=bob_app, api=acme_api, plan=manual, actor=alice)
    services.subscription_reject(subscription=first, actor=alice, note="no")
    second = services.subscription_request(consumer=bob_app, api=acme_api, plan=manual, actor=alice)
    services.subscription_approve(subscription=second, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    services.consumer_unblock(consumer=bob_app, actor=alice)
    sunset = timezone.now() + timedelta(days=90)
    services.api_deprecate(api=acme_api, actor=alice, sunset_at=sunset)
    services.api_retire(api=acme_api, actor=alice)
    assert [t for t in event_types() if not t.startswith("key.")] == [
        "subscription.requested",
        "subscription.rejected",
        "subscription.requested",
        "subscription.approved",
        "consumer.blocked",
        "consumer.unblocked",
        "api.deprecated",
        "api.retired",
        "subscription.cancelled",  # retiring the API cancelled the open subscription
    ]
    deprecated = Event.objects.get(event_type="api.deprecated")
    assert deprecated.data["sunset_at"] == sunset.isoformat().replace("+00:00", "Z")
    cancelled = Event.objects.get(event_type="subscription.cancelled")
    assert cancelled.data == {**cancelled.data, "subscription_id": second.pk, "status": "cancelled"}


def test_a_failed_service_call_leaves_no_event(acme, acme_api, bob_app, alice):
    services.subscription_request(consumer=bob_app, api=acme_api, actor=alice)
    with pytest.raises(Exception, match="already has a pending or active subscription"):
        services.subscription_request(consumer=bob_app, api=acme_api, actor=alice)
    assert event_types().count("subscription.requested") == 1


def test_unknown_event_type_is_a_programming_error(acme):
    with pytest.raises(ValueError, match=r"unknown event type 'key\.exploded'"):
        events.emit(tenant_id="acme", event_type="key.exploded", data={})
