"""The event outbox and its catalogue: what the services record for webhooks, in the transaction of the change.

``emit`` writes one ``Event`` row with the caller's database connection, so it commits or rolls back with the change
that caused it (the services call it next to their ``AuditEvent``). ``manage.py deliver_events`` reads the rows later
and sends them (apimgmt/webhooks.py); nothing here does I/O beyond that one INSERT. Every event type is named in
``CATALOGUE``, and docs/events/<type>.schema.json describes the body a receiver gets for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from apimgmt import circuit_events, limits, redis_client
from apimgmt.models import Api, ApiKey, Consumer, Event, Policy, Subscription, Tenant

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
    "quota.threshold": "A quota window of a consumer (or key) reached 80 %, then 100 % (each once per window).",
    "circuit.opened": "The gateway's circuit breaker for an API opened: its upstream is failing (once across workers).",
    "circuit.closed": "The circuit breaker of an API closed again: a probe reached its upstream (once across workers).",
}
EVENT_TYPES = tuple(CATALOGUE)

# quota.threshold: the shares of a quota window that are announced, each once per window and counter.
QUOTA_THRESHOLDS = (80, 100)

# quota.threshold: how long after a window ended its counter is still read. The deliverer scans every 10 s, so a
# crossing in a window's last seconds is seen by the first scans of the next window (each notice still once).
QUOTA_GRACE_SECONDS = 30.0

# key.expiring thresholds, largest first: a notice per threshold, the tightest that applies.
KEY_EXPIRING_THRESHOLDS: tuple[tuple[str, timedelta], ...] = (("7d", timedelta(days=7)), ("1d", timedelta(days=1)))


@dataclass(frozen=True)
class OutboxReader:
    """A reader of the outbox besides the webhooks, such as the portal's developer mail.

    ``fan_out`` gets every batch of new events inside the transaction that marks them dispatched, so the rows it
    writes commit exactly once with that mark; ``send_due`` runs once per deliverer round, outside any transaction,
    and returns how many it sent.
    """

    fan_out: Callable[[list[Event]], None]
    send_due: Callable[[], int]


# Filled by the apps that read the outbox too (portal/apps.py), the way probes.READINESS_CHECKS is: apimgmt never
# imports them.
OUTBOX_READERS: dict[str, OutboxReader] = {}


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


def owned_counter_windows(
    subscription: Subscription, policies: Iterable[Policy], now: float, key_ids: Callable[[], list[str]]
) -> Iterator[tuple[limits.CounterWindow, str, str]]:
    """The windows of ``policies`` whose counter belongs to the subscription's consumer or one of its usable keys
    (``key_ids``, asked at most once), with their scope ("consumer_id"/"key_id") and value. A counter shared by an
    API, a tenant or an address is nobody's own and is left out."""
    tenant = subscription.consumer.tenant
    keys: list[str] | None = None
    for policy in policies:
        scope = limits.scope_of(policy.config)
        if scope == "consumer_id":
            values = [subscription.consumer_id]
        elif scope == "key_id":
            if keys is None:
                keys = key_ids()
            values = keys
        else:
            continue
        for value in values:
            for window in limits.counter_windows(
                tenant_id=tenant.id,
                tz_name=tenant.timezone,
                policy_id=policy.pk,
                policy_name=policy.name,
                policy_type=policy.policy_type,
                config=policy.config,
                scope=value,
                now=now,
            ):
                yield window, scope, value


def _quota_counters(subscription: Subscription, now: float) -> list[tuple[limits.CounterWindow, str, str]]:
    """The quota windows counting this subscription's traffic, with their scope ("consumer_id"/"key_id") and value:
    the plan's and the API's quota policies whose counter belongs to the consumer or one of its keys."""
    policies: list[Policy] = [*subscription.api.policies.all()]
    if subscription.plan is not None:
        policies += list(subscription.plan.policies.all())
    quotas = [policy for policy in policies if policy.policy_type == Policy.Type.QUOTA]
    return list(
        owned_counter_windows(
            subscription,
            quotas,
            now,
            lambda: [k.pk for k in subscription.consumer.keys.all() if k.is_usable()],  # prefetched
        )
    )


def mget_batches(client: Any, keys: list[str], batch_size: int) -> Iterator[list[str]]:
    """``keys`` in batches one MGET may read: on Redis Cluster one batch never mixes hash tags (tenants), whose keys
    are in different slots (redis-py refuses such an MGET with RedisClusterException); elsewhere any keys go."""
    groups: dict[str, list[str]] = {}
    if redis_client.is_cluster(client):
        for key in keys:
            groups.setdefault(redis_client.hash_tag(key), []).append(key)
    else:
        groups[""] = keys
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def quota_threshold_notices(*, client: Any, now: datetime | None = None, batch_size: int = 500) -> int:
    """Emit ``quota.threshold`` for every consumer or key quota window at 80 % or 100 %, once per window; return
    how many.

    It reads the gateway's own counters (``apimgmt.limits`` names them) from here, the deliverer, in batches of
    MGET (one tenant per batch on Redis Cluster): the gateway's request path does not change by one command. For
    QUOTA_GRACE_SECONDS after a window ends its counter is read too, so a crossing between the window's last scan
    and its end is announced late rather than never. Exactly once per window, counter and threshold however many
    requests cross it at once and however many deliverers scan: the notice's dedupe key is the counter's Redis key
    (policy, window start, consumer or key) and the threshold, under a unique index.
    """
    moment = (now or timezone.now()).timestamp()
    subscriptions = (
        Subscription.objects.filter(status=Subscription.Status.ACTIVE, consumer__tenant__status=Tenant.Status.ACTIVE)
        # Only subscriptions that some quota counts: the plan's or the API's.
        .filter(
            Q(pk__in=Subscription.objects.filter(plan__policies__policy_type=Policy.Type.QUOTA).values("pk"))
            | Q(pk__in=Subscription.objects.filter(api__policies__policy_type=Policy.Type.QUOTA).values("pk"))
        )
        .select_related("consumer__tenant", "plan", "api")
        .prefetch_related("api__policies", "plan__policies", "consumer__keys")
        .order_by("pk")
    )
    counters: dict[str, tuple[limits.CounterWindow, str, str, Subscription]] = {}
    for subscription in subscriptions.iterator(chunk_size=500):
        # The windows now and QUOTA_GRACE_SECONDS ago: the same keys, but for a window that rolled over since, the
        # previous window's, so a crossing in its last seconds (after the scan before) is still announced.
        for at in (moment, moment - QUOTA_GRACE_SECONDS):
            for window, scope, value in _quota_counters(subscription, at):
                counters.setdefault(window.key, (window, scope, value, subscription))
    sent = 0
    for batch in mget_batches(client, list(counters), batch_size):
        due: list[tuple[str, int, int]] = []
        for key, raw in zip(batch, client.mget(batch), strict=True):
            used = int(raw or 0)
            limit = counters[key][0].limit
            due += [(key, t, used) for t in QUOTA_THRESHOLDS if used >= math.ceil(limit * t / 100)]
        dedupe = {f"quota.threshold:{key}:{t}": (key, t, used) for key, t, used in due}
        already = set(Event.objects.filter(dedupe_key__in=list(dedupe)).values_list("dedupe_key", flat=True))
        for dedupe_key, (key, threshold, used) in dedupe.items():
            if dedupe_key in already:
                continue
            window, scope, value, subscription = counters[key]
            data = {
                "consumer_id": subscription.consumer_id,
                "key_id": value if scope == "key_id" else None,
                "api_id": subscription.api_id,
                "subscription_id": subscription.pk,
                "plan_id": subscription.plan_id,
                "policy_id": window.policy_id,
                "policy_name": window.policy_name,
                "window": window.label,
                "window_start": _iso(datetime.fromtimestamp(window.end - window.period, tz=UTC)),
                "window_end": _iso(datetime.fromtimestamp(window.end, tz=UTC)),
                "limit": window.limit,
                "used": min(used, window.limit),
                "threshold": threshold,
            }
            with transaction.atomic():
                event = emit(
                    tenant_id=subscription.consumer.tenant_id,
                    event_type="quota.threshold",
                    data=data,
                    dedupe_key=dedupe_key,
                )
            sent += event is not None
    return sent


def circuit_notices(*, client: Any, batch_size: int = 500) -> int:
    """Copy the gateways' circuit announcements (apimgmt/circuit_events.py) into the outbox as ``circuit.opened`` /
    ``circuit.closed``; return how many events were emitted.

    Each stream entry becomes one event: its stream id is the event's dedupe key, so a deliverer that dies between
    its commit and deleting the entries, or two deliverers reading the same entries, add nothing twice. Entries are
    deleted only after the commit. Announcements about an API that is gone (or of another tenant) are dropped.
    """
    emitted = 0
    for raw_tenant in sorted(client.smembers(circuit_events.TENANTS_KEY)):
        tenant_id = raw_tenant.decode() if isinstance(raw_tenant, bytes) else str(raw_tenant)
        stream = circuit_events.stream_key(tenant_id)
        entries = client.xrange(stream, count=batch_size)
        if not entries:
            continue
        decoded = [
            (
                entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
                {
                    (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in fields.items()
                },
            )
            for entry_id, fields in entries
        ]
        apis = Api.objects.filter(tenant_id=tenant_id, pk__in={f.get("api_id") for _, f in decoded}).in_bulk()
        with transaction.atomic():
            for entry_id, fields in decoded:
                api = apis.get(fields.get("api_id", ""))
                state = fields.get("state")
                if api is None or state not in (circuit_events.OPEN, circuit_events.CLOSED):
                    continue
                at = datetime.fromtimestamp(int(fields.get("at") or 0) / 1000, tz=UTC)
                event = emit(
                    tenant_id=tenant_id,
                    event_type="circuit.opened" if state == circuit_events.OPEN else "circuit.closed",
                    data={
                        **api_data(api),
                        "circuit": state,
                        "changed_at": _iso(at),
                        "failure_threshold": api.cb_failure_threshold,
                        "recovery_timeout_seconds": api.cb_recovery_timeout,
                    },
                    dedupe_key=f"circuit:{tenant_id}:{entry_id}",
                )
                emitted += event is not None
        client.xdel(stream, *[entry_id for entry_id, _ in decoded])
    return emitted
