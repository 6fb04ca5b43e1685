"""The admin's home page: how the platform is doing, per tenant the user administers.

Traffic, 5xx and 429 of the last 24 hours from the hourly per-tenant totals (a few rows per tenant and hour); subscriptions waiting for a decision;
keys that expire within 7 days; APIs whose circuit is open, as the gateways announced it in Redis
(apimgmt/circuit_events.py), and APIs whose upstream failed in the last 15 minutes, from the usage minutes; the
latest audit events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db.models import Exists, Max, OuterRef, Q, QuerySet, Sum
from django.urls import reverse
from django.utils.timezone import now

from apimgmt import circuit_events, selectors
from apimgmt.models import (
    Api,
    ApiKey,
    AuditEvent,
    Subscription,
    Tenant,
    TenantMembership,
    UsageHourlyTotal,
    UsageRecord,
)
from apimgmt.redis_client import get_redis

TRAFFIC_WINDOW = timedelta(hours=24)
EXPIRY_WINDOW = timedelta(days=7)
FAILING_WINDOW = timedelta(minutes=15)
# The gateway answers these when the upstream could not be reached, broke the exchange or was too slow; any other
# 5xx counts only when the upstream itself sent it (the row has upstream time: its 503 of an open circuit, or of a
# limit store that is down, has none).
UPSTREAM_FAILURE_STATUSES = (502, 504)
LIST_LIMIT = 10


@dataclass(frozen=True)
class TenantTraffic:
    tenant: Tenant
    requests: int
    had_traffic_before: bool  # any traffic older than the window: "none in the last 24 h", not "none yet"
    server_errors: int
    rate_limited: int
    usage_url: str
    portal_url: str

    @property
    def error_percent(self) -> float:
        return round(100 * self.server_errors / self.requests, 1) if self.requests else 0.0


@dataclass(frozen=True)
class OpenCircuit:
    api_id: str
    api_name: str
    tenant_id: str
    change_url: str


@dataclass(frozen=True)
class FailingApi:
    api_id: str
    api_name: str
    tenant_id: str
    failures: int
    last_seen: datetime
    change_url: str


def _tenants(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Tenant]:
    """Platform staff see every tenant; other staff the tenants they administer (as the rest of the admin)."""
    if selectors.is_platform_staff(user):
        return Tenant.objects.all()
    return Tenant.objects.filter(id__in=selectors.tenant_ids_for_user(user, roles=(TenantMembership.Role.ADMIN,)))


def tenant_traffic(tenants: QuerySet[Tenant], *, at: datetime) -> list[TenantTraffic]:
    """One row per tenant, busiest first, zeros for tenants without traffic."""
    sums = {
        row["tenant_id"]: row
        for row in UsageHourlyTotal.objects.filter(
            tenant__in=tenants, dimension="tenant", timestamp__gte=at - TRAFFIC_WINDOW
        )
        .values("tenant_id")
        .annotate(
            requests=Sum("request_count"),
            server_errors=Sum("request_count", filter=Q(status_code__gte=500)),
            rate_limited=Sum("request_count", filter=Q(status_code=429)),
        )
    }
    earlier = UsageHourlyTotal.objects.filter(
        tenant=OuterRef("pk"), dimension="tenant", timestamp__lt=at - TRAFFIC_WINDOW
    )
    rows = [
        TenantTraffic(
            tenant=tenant,
            requests=sums.get(tenant.id, {}).get("requests") or 0,
            had_traffic_before=tenant.had_traffic_before,
            server_errors=sums.get(tenant.id, {}).get("server_errors") or 0,
            rate_limited=sums.get(tenant.id, {}).get("rate_limited") or 0,
            usage_url=reverse("admin:apimgmt_tenant_usage", args=[tenant.id]),
            portal_url=f"/portal/{tenant.id}/",
        )
        for tenant in tenants.annotate(had_traffic_before=Exists(earlier)).order_by("id")
    ]
    return sorted(rows, key=lambda row: -row.requests)


def open_circuits(tenants: QuerySet[Tenant]) -> tuple[list[OpenCircuit], str]:
    """APIs whose circuit the gateways announce as open, and why the list may be incomplete ("" when it is not).

    Read from the announced state keys rather than the outbox's circuit.opened/closed events: those exist only once
    the event deliverer copied them, and an ``open`` whose closing was never announced stays in the outbox for good
    while its state key expires. One SMEMBERS, then one query for the APIs of the tenants that ever announced, and
    one MGET per such tenant: never a call per API.
    """
    client = get_redis()
    if client is None:
        return [], "Circuit states are not shared: REDIS_URL is not set."
    try:
        announcing = circuit_events.announcing_tenants(client)
        apis = (
            list(
                Api.objects.filter(tenant__in=tenants, tenant_id__in=announcing)
                .order_by("tenant_id", "api_name")
                .values_list("pk", "api_name", "tenant_id")
            )
            if announcing
            else []
        )
        per_tenant: dict[str, list[str]] = {}
        for api_id, _name, tenant_id in apis:
            per_tenant.setdefault(tenant_id, []).append(api_id)
        found = circuit_events.open_apis(client, per_tenant)
    except redis.RedisError:
        return [], "Circuit states are unknown right now: Redis did not answer."
    return [
        OpenCircuit(api_id, name, tenant_id, reverse("admin:apimgmt_api_change", args=[api_id]))
        for api_id, name, tenant_id in apis
        if api_id in found
    ][:LIST_LIMIT], ""


def failing_apis(tenants: QuerySet[Tenant], *, at: datetime) -> list[FailingApi]:
    """APIs whose upstream failed in the last minutes (most failures first): 502 or 504, or another 5xx the upstream
    answered itself. A minute row mixes the requests of one status, so an upstream's own 503 in the same minute as
    the gateway's 503s counts them all."""
    rows = list(
        UsageRecord.objects.filter(tenant__in=tenants, timestamp__gte=at - FAILING_WINDOW, status_code__gte=500)
        .filter(Q(status_code__in=UPSTREAM_FAILURE_STATUSES) | Q(upstream_latency_ms_sum__gt=0))
        .values("api_id", "tenant_id")
        .annotate(failures=Sum("request_count"), last_seen=Max("timestamp"))
        .order_by("-failures")[:LIST_LIMIT]
    )
    names = dict(Api.objects.filter(pk__in=[row["api_id"] for row in rows]).values_list("pk", "api_name"))
    return [
        FailingApi(
            api_id=row["api_id"],
            api_name=names.get(row["api_id"], "(deleted API)"),
            tenant_id=row["tenant_id"],
            failures=row["failures"] or 0,
            last_seen=row["last_seen"],
            change_url=reverse("admin:apimgmt_api_change", args=[row["api_id"]]) if row["api_id"] in names else "",
        )
        for row in rows
    ]


def home_context(user: AbstractBaseUser | AnonymousUser) -> dict[str, Any]:
    at = now()
    tenants = _tenants(user)
    pending = Subscription.objects.filter(status=Subscription.Status.PENDING, api__tenant__in=tenants)
    # Keys being replaced by a rotation expire on purpose; only keys nobody has replaced yet need attention.
    expiring = ApiKey.objects.filter(
        active=True,
        revoked_at__isnull=True,
        expires_at__gt=at,
        expires_at__lte=at + EXPIRY_WINDOW,
        consumer__tenant__in=tenants,
        successors__isnull=True,
    )
    circuits, circuits_unknown = open_circuits(tenants)
    return {
        "traffic": tenant_traffic(tenants, at=at),
        "pending_count": pending.count(),
        "pending": pending.select_related("consumer", "api", "plan").order_by("created_at")[:LIST_LIMIT],
        "pending_url": reverse("admin:apimgmt_subscription_changelist") + "?status__exact=pending",
        "expiring_count": expiring.count(),
        "expiring": expiring.select_related("consumer").order_by("expires_at")[:LIST_LIMIT],
        "open_circuits": circuits,
        "circuits_unknown": circuits_unknown,
        "failing": failing_apis(tenants, at=at),
        "failing_minutes": int(FAILING_WINDOW.total_seconds() // 60),
        "audit": (
            AuditEvent.objects.all()
            if selectors.is_platform_staff(user)
            else AuditEvent.objects.filter(tenant_id__in=tenants.values("id"))
        )[:LIST_LIMIT],
    }
