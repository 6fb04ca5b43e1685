"""Per-tenant usage overview for the admin: the last 24 hours of requests, errors, 429s, top APIs and consumers, and
WebSocket connections, time connected, messages and their bytes when the tenant had any."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils.safestring import SafeString
from django.utils.timezone import now

from apimgmt.charts import STATUS_SERIES, ChartBucket, bar_chart, legend, status_class
from apimgmt.models import Api, Consumer, Tenant, UsageHourlyTotal

WINDOW = timedelta(hours=24)
TOP = 5


# A WebSocket connection's numbers are on its status-101 rows; their bytes are its messages' (apimgmt/models.py).
WEBSOCKET_STATUS = 101
WEBSOCKET_NUMBERS = ("connections", "connection_seconds", "messages_in", "messages_out", "bytes_in", "bytes_out")


def _sums() -> dict[str, Sum]:
    websocket = Q(status_code=WEBSOCKET_STATUS)
    return {
        "requests": Sum("request_count"),
        "errors": Sum("request_count", filter=Q(status_code__gte=500)),
        "rate_limited": Sum("request_count", filter=Q(status_code=429)),
        "connections": Sum("connection_count"),
        "connection_seconds": Sum("connection_seconds"),
        "messages_in": Sum("messages_in"),
        "messages_out": Sum("messages_out"),
        "bytes_in": Sum("bytes_in", filter=websocket),
        "bytes_out": Sum("bytes_out", filter=websocket),
    }


def _websocket(row: dict[str, object]) -> dict[str, object]:
    """The WebSocket numbers of a summed row, zeros for none."""
    return {name: row.get(name) or 0 for name in WEBSOCKET_NUMBERS}


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
            **_websocket(row),
        }
        for row in rows
    ]


def hourly_chart(whole: QuerySet[UsageHourlyTotal], start: datetime) -> SafeString:
    """24 hours of the tenant's traffic, 2xx/3xx, 4xx, 429 and 5xx as separate bars (apimgmt/charts.py)."""
    per_hour: dict[datetime, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in whole.values("timestamp", "status_code").annotate(n=Sum("request_count")):
        per_hour[row["timestamp"]][status_class(row["status_code"])] += row["n"] or 0
    buckets = [
        ChartBucket(label=f"{hour:%H:%M}", values=dict(per_hour.get(hour, {})))
        for hour in (start + timedelta(hours=i) for i in range(24))
    ]
    return bar_chart(
        buckets,
        STATUS_SERIES,
        title="Requests per hour, last 24 hours, by status",
        chart_id="tenant-usage",
        x_title="Hour (UTC)",
    )


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
    websocket = _websocket(totals)
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
        "websocket": websocket,
        # Columns only for a tenant with connections, as the portal's usage table does.
        "has_connections": bool(websocket["connections"] or websocket["connection_seconds"]),
        "chart": hourly_chart(whole, start) if requests else None,
        "chart_legend": legend(STATUS_SERIES),
    }
    return render(request, "admin/apimgmt/usage_overview.html", context)
