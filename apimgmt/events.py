"""The event outbox and its catalogue: what the services record for webhooks, in the transaction of the change.

``emit`` writes one ``Event`` row with the caller's database connection, so it commits or rolls back with the change
that caused it (the services call it next to their ``AuditEvent``). ``manage.py deliver_events`` reads the rows later
and sends them (apimgmt/webhooks.py); nothing here does I/O beyond that one INSERT. Every event type is named in
``CATALOGUE``, and docs/events/<type>.schema.json describes the body a receiver gets for it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from apimgmt.models import Api, ApiKey, Consumer, Event, Subscription

# Event type -> what it means. The keys are the product's contract with receivers (docs/webhooks.md).
CATALOGUE: dict[str, str] = {
    "key.created": "A key was created (also the successor of a rotation).",
    "key.rotated": "A key was rotated: it keeps working until its new expires_at; successor_key_id replaces it.",
    "key.revoked": "A key was revoked for good.",
    "key.expiring": "A key expires within 7 days, then within 1 day (each notice once per key and expiry).",
    "subscription.requested": "A consumer asked for access to an API (status pending, or active when automatic).",
    "subscription.approved": "A pending subscription was approved.",
    "subscription.rejected": "A pending subscription was rejected.",
    "subscription.cancelled": "A subscription was cancelled (by its owner, an admin, or its API's retirement).",
    "subscription.plan_changed": "A subscription moved to another plan (now, or at the start of a quota window).",
    "consumer.blocked": "A consumer was blocked: its keys are refused.",
    "consumer.unblocked": "A blocked consumer was unblocked.",
    "api.deprecated": "An API was deprecated; sunset_at is its announced retirement, when set.",
    "api.retired": "An API was retired: it stopped routing and its open subscriptions were cancelled.",
}
EVENT_TYPES = tuple(CATALOGUE)

# key.expiring thresholds, largest first: a notice per threshold, the tightest that applies.
KEY_EXPIRING_THRESHOLDS: tuple[tuple[str, timedelta], ...] = (("7d", timedelta(days=7)), ("1d", timedelta(days=1)))


def emit(*, tenant_id: str, event_type: str, data: dict[str, Any], dedupe_key: str | None = None) -> Event | None:
    """Record an event in the current transaction. With ``dedupe_key``, a second emit of the same key is a no-op
    (returns None), also when another process emitted it concurrently (the unique index decides)."""
    if event_type not in CATALOGUE:
        raise ValueError(f"unknown event type {event_type!r}; add it to apimgmt.events.CATALOGUE")
    event = Event(tenant_id=tenant_id, event_type=event_type, data=data, dedupe_key=dedupe_key)
    if dedupe_key is None:
        event.save(force_insert=True)
        return event
    try:
        with transaction.atomic():
            event.save(force_insert=True)
    except IntegrityError:
        return None
    return event


def envelope(event: Event) -> dict[str, Any]:
    """The JSON body a receiver gets (Standard Webhooks' type/timestamp/data, plus the id and tenant)."""
    return {
        "id": event.id,
        "type": event.event_type,
        "timestamp": _iso(event.occurred_at),
        "tenant_id": event.tenant_id,
        "data": event.data,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


# Payloads: one builder per object kind, so every event about a key carries the same fields. -----------------


def key_data(key: ApiKey, **extra: Any) -> dict[str, Any]:
    """A key as receivers see it: never the key, nor its hash; the 12-character display prefix only."""
    return {
        "key_id": key.key_id,
        "consumer_id": key.consumer_id,
        "name": key.name,
        "key_prefix": key.key_prefix,
        "expires_at": _iso(key.expires_at),
        "revoked_at": _iso(key.revoked_at),
        **extra,
    }


def subscription_data(subscription: Subscription, **extra: Any) -> dict[str, Any]:
    return {
        "subscription_id": subscription.pk,
        "consumer_id": subscription.consumer_id,
        "api_id": subscription.api_id,
        "plan_id": subscription.plan_id,
        "status": subscription.status,
        "decision_note": subscription.decision_note,
        **extra,
    }


def consumer_data(consumer: Consumer) -> dict[str, Any]:
    return {"consumer_id": consumer.pk, "name": consumer.name, "status": consumer.status}


def api_data(api: Api) -> dict[str, Any]:
    return {
        "api_id": api.pk,
        "api_name": api.api_name,
        "base_path": api.base_path,
        "status": api.status,
        "sunset_at": _iso(api.sunset_at),
    }


# Notices decided by a scan rather than by a change. ----------------------------------------------------------


def key_expiring_notices(*, now: datetime | None = None) -> int:
    """Emit ``key.expiring`` for every live key inside a threshold that has not had that notice; return how many.

    Safe to run in several processes at once: each notice has a dedupe key (key, threshold, expiry), so the unique
    index lets exactly one insert through. A key whose expiry moves gets notices for the new expiry. A key that was
    rotated is skipped: its end is the overlap the caller chose, and its successor is what matters.
    """
    moment = now or timezone.now()
    horizon = moment + KEY_EXPIRING_THRESHOLDS[0][1]
    due = (
        ApiKey.objects.live(moment)
        .filter(expires_at__lte=horizon, successors__isnull=True)
        .select_related("consumer")
        .order_by("expires_at")
    )
    candidates: list[tuple[ApiKey, str, str, timedelta]] = []
    for key in due:
        assert key.expires_at is not None
        left = key.expires_at - moment
        label = next(name for name, span in reversed(KEY_EXPIRING_THRESHOLDS) if left <= span)
        dedupe = f"key.expiring:{key.key_id}:{label}:{int(key.expires_at.timestamp())}"
        candidates.append((key, label, dedupe, left))
    # One read skips the notices already sent; the unique index settles the races that read cannot see.
    already = set(Event.objects.filter(dedupe_key__in=[c[2] for c in candidates]).values_list("dedupe_key", flat=True))
    sent = 0
    for key, label, dedupe, left in candidates:
        if dedupe in already:
            continue
        with transaction.atomic():
            event = emit(
                tenant_id=key.consumer.tenant_id,
                event_type="key.expiring",
                data=key_data(key, threshold=label, expires_in_seconds=int(left.total_seconds())),
                dedupe_key=dedupe,
            )
        sent += event is not None
    return sent
