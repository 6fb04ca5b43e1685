"""Per-tenant usage overview for the admin: the last 24 hours of requests, errors, 429s, top APIs and consumers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Q, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils.timezone import now

from apimgmt.models import Api, Consumer, Tenant, UsageHourlyTotal

WINDOW = timedelta(hours=24)
TOP = 5
CHART_WIDTH, CHART_HEIGHT, CHART_GAP = 720, 140, 2


@dataclass(frozen=True)
class Bar:
    """One hour of the chart, in SVG coordinates (computed here: the page needs no JavaScript)."""

    x: float
    width: float
    y: float
    height: float
    error_y: float
    error_height: float
    label: str


def _sums() -> dict[str, Sum]:
    return {
        "requests": Sum("request_count"),
        "errors": Sum("request_count", filter=Q(status_code__gte=500)),
        "rate_limited": Sum("request_count", filter=Q(status_code=429)),
    }


def _top(records: object, field: str, names: dict[str, str]) -> list[dict[str, object]]:
    rows = list(
        records.values(field).annotate(**_sums()).order_by("-requests", field)[:TOP]  # type: ignore[attr-defined]
    )
    return [
        {
            "id": row[field] or "—",
            "name": names.get(row[field], ""),
            "requests": row["requests"] or 0,
            "errors": row["errors"] or 0,
            "rate_limited": row["rate_limited"] or 0,
        }
        for row in rows
    ]


def _chart(hourly: dict[datetime, tuple[int, int]], start: datetime) -> list[Bar]:
    peak = max((requests for requests, _ in hourly.values()), default=0) or 1
    width = CHART_WIDTH / 24
    bars = []
    for i in range(24):
        hour = start + timedelta(hours=i)
        requests, errors = hourly.get(hour, (0, 0))
        height = CHART_HEIGHT * requests / peak
        error_height = CHART_HEIGHT * errors / peak
        bars.append(
            Bar(
                x=round(i * width, 1),
                width=round(width - CHART_GAP, 1),
                y=round(CHART_HEIGHT - height, 1),
                height=round(height, 1),
                error_y=round(CHART_HEIGHT - error_height, 1),
                error_height=round(error_height, 1),
                label=f"{hour:%H:%M} UTC: {requests} requests, {errors} server errors",
            )
        )
    return bars


@staff_member_required
def usage_overview(request: HttpRequest, tenant_id: str) -> HttpResponse:
    """``admin/apimgmt/tenant/<tenant_id>/usage/``: platform staff's view of one tenant's traffic."""
    tenant = get_object_or_404(Tenant, pk=tenant_id)
    end = now()
    # Whole hours, so the chart's 24 bars line up with the buckets they show.
    start = end.replace(minute=0, second=0, microsecond=0) - WINDOW + timedelta(hours=1)
    # Whole UTC hours of the tenant's totals (and each API's and consumer's): a few rows per hour, never one per key.
    records = UsageHourlyTotal.objects.filter(tenant=tenant, timestamp__gte=start)
    whole = records.filter(dimension="tenant")
    totals = whole.aggregate(**_sums())
    requests = totals["requests"] or 0
    hourly = {
        row["timestamp"]: (row["requests"] or 0, row["errors"] or 0)
        for row in whole.values("timestamp").annotate(**_sums())
    }
    api_names = dict(Api.objects.filter(tenant=tenant).values_list("id", "api_name"))
    consumer_names = dict(Consumer.objects.filter(tenant=tenant).values_list("id", "name"))
    context = {
        **admin.site.each_context(request),
        "title": f"Usage of {tenant.name} — last 24 hours",
        "tenant": tenant,
        "opts": Tenant._meta,
        "start": start,
        "end": end,
        "requests": requests,
        "errors": totals["errors"] or 0,
        "rate_limited": totals["rate_limited"] or 0,
        "error_rate_percent": round(100 * (totals["errors"] or 0) / requests, 1) if requests else 0.0,
        "top_apis": _top(records.filter(dimension="api"), "value", api_names),
        "top_consumers": _top(records.filter(dimension="consumer"), "value", consumer_names),
        "bars": _chart(hourly, start),
        "chart_width": CHART_WIDTH,
        "chart_height": CHART_HEIGHT,
    }
    return render(request, "admin/apimgmt/usage_overview.html", context)
