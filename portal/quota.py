"""Quota left right now for an app: every policy window of its subscribed APIs and plans, read from Redis."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from apimgmt import limits
from apimgmt.models import Api, Consumer, Policy, Subscription
from apimgmt.redis_client import get_redis

logger = logging.getLogger("portal")


@dataclass(frozen=True)
class QuotaRow:
    api_name: str
    policy_name: str
    window: str
    scope: str  # what the counter is shared by, in words
    limit: int | None
    remaining: int | None  # None when it cannot be known (per-IP counters, Redis unavailable)
    resets_in_seconds: int | None
    shadow: bool
    note: str = ""

    @property
    def used_percent(self) -> int:
        if not self.limit or self.remaining is None:
            return 0
        return round(100 * (self.limit - self.remaining) / self.limit)


@dataclass(frozen=True)
class QuotaReport:
    rows: list[QuotaRow]
    available: bool  # False when Redis could not be read


SCOPE_WORDS = {
    "consumer_id": "this app",
    "key_id": "key",
    "api": "all callers of the API",
    "tenant_id": "all callers in this portal",
    "ip": "each client IP",
}


def _policies(app: Consumer, api: Api) -> list[Policy]:
    policies = list(api.policies.all())
    subscription = (
        Subscription.objects.filter(consumer=app, api=api, status=Subscription.Status.ACTIVE)
        .select_related("plan")
        .first()
    )
    if subscription is not None and subscription.plan is not None:
        policies += list(subscription.plan.policies.all())
    return policies


def quota_left(*, app: Consumer, apis: list[Api]) -> QuotaReport:
    now = time.time()
    tenant = app.tenant
    pending: list[tuple[QuotaRow, limits.CounterWindow]] = []
    rows: list[QuotaRow] = []
    live_keys = list(app.keys.live().values_list("key_id", "key_prefix"))
    for api in apis:
        for policy in _policies(app, api):
            shadow = policy.mode == Policy.Mode.SHADOW
            scope_kind = limits.scope_of(policy.config)
            # Whose counter to read: the gateway's own rule (limits.counter_scope), once per live key for per-key
            # limits; per-address counters cannot be shown (one per caller address).
            if scope_kind == "key_id":
                scopes = [(key_id, f"key {prefix}…") for key_id, prefix in live_keys]
            else:
                scopes = [("", SCOPE_WORDS.get(scope_kind, scope_kind))]
            for key_id, words in scopes:
                scope = limits.counter_scope(
                    policy.config,
                    tenant_id=tenant.id,
                    api_id=api.pk,
                    consumer_id=app.pk,
                    key_id=key_id,
                    client_ip="-",
                )
                for window in limits.counter_windows(
                    tenant_id=tenant.id,
                    tz_name=tenant.timezone,
                    policy_id=policy.id,
                    policy_name=policy.name,
                    policy_type=policy.policy_type,
                    config=policy.config,
                    scope=scope,
                    now=now,
                ):
                    if scope_kind == "ip":
                        row = QuotaRow(
                            api.api_name,
                            policy.name,
                            window.label,
                            words,
                            window.limit,
                            None,
                            None,
                            shadow,
                            "counted per calling address",
                        )
                        rows.append(row)
                        continue
                    row = QuotaRow(api.api_name, policy.name, window.label, words, window.limit, None, None, shadow)
                    pending.append((row, window))
    client = get_redis()
    available = client is not None
    if client is not None and pending:
        try:
            results = limits.read_remaining(client, [w for _, w in pending])
        except redis.RedisError:
            logger.warning("portal could not read rate-limit counters from Redis", exc_info=True)
            available = False
        else:
            for (row, _), result in zip(pending, results, strict=True):
                rows.append(
                    QuotaRow(
                        row.api_name,
                        row.policy_name,
                        row.window,
                        row.scope,
                        row.limit,
                        result.remaining,
                        result.resets_in_seconds,
                        row.shadow,
                    )
                )
            return QuotaReport(rows=rows, available=True)
    rows.extend(row for row, _ in pending)
    return QuotaReport(rows=rows, available=available)
