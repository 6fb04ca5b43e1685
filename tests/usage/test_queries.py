"""Long ranges read the rollups: the admin overview, the portal's 30-day chart and GET usage/ by hour or day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apimgmt.models import Consumer, Tenant
from apimgmt.usage import add_minute
from portal.usage import usage_series

pytestmark = pytest.mark.django_db


TABLES = (
    "am_usage_records",
    "am_usage_hourly",
    "am_usage_daily",
    "am_usage_hourly_totals",
    "am_usage_daily_totals",
)


def _tables(queries: CaptureQueriesContext) -> set[str]:
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    return {t for t in TABLES if f'"{t}"' in sql}


def test_usage_by_day_reads_the_daily_rollup_and_its_days_are_the_tenants(
    client: Client, staff: User, acme: Tenant
) -> None:
    acme.timezone = "America/New_York"
    acme.save()
    zone = ZoneInfo("America/New_York")
    late = datetime(2026, 1, 5, 23, 59, 30, tzinfo=zone)  # 04:59 UTC on the 6th
    add_minute(tenant_id="acme", timestamp=late, status_code=200, request_count=3)
    add_minute(tenant_id="acme", timestamp=late + timedelta(minutes=1), status_code=200, request_count=4)
    client.force_login(staff)

    with CaptureQueriesContext(connection) as queries:
        body = client.get(
            "/mgmt/v1/usage/?tenant_id=acme&interval=day&from=2026-01-01T00:00:00Z&to=2026-01-10T00:00:00Z"
        )
    assert body.status_code == 200, body.content
    assert _tables(queries) == {"am_usage_daily_totals"}, "a whole tenant: its totals, not a row per key"
    buckets = {row["bucket"]: row["requests"] for row in body.json()["results"]}
    assert buckets == {"2026-01-05T05:00:00Z": 3, "2026-01-06T05:00:00Z": 4}, "local midnights, as UTC instants"


def test_usage_by_hour_reads_the_hourly_rollup_and_by_minute_the_minutes(
    client: Client, staff: User, acme: Tenant
) -> None:
    for minute in range(0, 120, 7):
        add_minute(
            tenant_id="acme",
            timestamp=datetime(2026, 1, 1, 10, tzinfo=UTC) + timedelta(minutes=minute),
            status_code=200,
            request_count=1,
            latency_ms_sum=2.0,
            latency_ms_max=2.0,
        )
    client.force_login(staff)
    window = "tenant_id=acme&from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z"

    with CaptureQueriesContext(connection) as queries:
        hourly = client.get(f"/mgmt/v1/usage/?{window}&interval=hour").json()["results"]
    assert _tables(queries) == {"am_usage_hourly_totals"}
    assert [(row["bucket"], row["requests"]) for row in hourly] == [
        ("2026-01-01T10:00:00Z", 9),
        ("2026-01-01T11:00:00Z", 9),
    ]
    with CaptureQueriesContext(connection) as queries:
        minutes = client.get(f"/mgmt/v1/usage/?{window}&interval=minute").json()["results"]
    assert _tables(queries) == {"am_usage_records"} and len(minutes) == 18


def test_admin_overview_reads_hours_and_the_portal_month_reads_days(
    client: Client, staff: User, acme: Tenant, bob_app: Consumer
) -> None:
    now = timezone.now()
    add_minute(
        tenant_id="acme", consumer_id=bob_app.pk, timestamp=now - timedelta(hours=2), status_code=200, request_count=11
    )
    client.force_login(staff)

    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/apimgmt/tenant/acme/usage/")
    assert page.status_code == 200 and "11" in page.content.decode()
    assert _tables(queries) == {"am_usage_hourly_totals"}

    with CaptureQueriesContext(connection) as queries:
        series = usage_series(app=bob_app, api_id=None, interval="day")
    assert _tables(queries) == {"am_usage_daily"}
    assert series.total_requests == 11


def test_usage_of_one_key_or_for_a_developer_reads_the_per_key_rows(
    client: Client, staff: User, bob: User, acme: Tenant, bob_app: Consumer
) -> None:
    at = datetime(2026, 1, 1, 10, tzinfo=UTC)
    add_minute(tenant_id="acme", consumer_id=bob_app.pk, key_id="key_b", timestamp=at, status_code=200, request_count=5)
    add_minute(tenant_id="acme", consumer_id="con_else", key_id="key_e", timestamp=at, status_code=200, request_count=7)
    window = "tenant_id=acme&interval=day&from=2025-12-30T00:00:00Z&to=2026-01-03T00:00:00Z"

    client.force_login(staff)
    with CaptureQueriesContext(connection) as queries:
        by_key = client.get(f"/mgmt/v1/usage/?{window}&key_id=key_b").json()["results"]
    assert _tables(queries) == {"am_usage_daily"} and [r["requests"] for r in by_key] == [5]
    grouped = client.get(f"/mgmt/v1/usage/?{window}&group_by=consumer_id").json()["results"]
    assert {r["consumer_id"]: r["requests"] for r in grouped} == {bob_app.pk: 5, "con_else": 7}

    client.force_login(bob)  # a developer sees only their own apps' usage
    with CaptureQueriesContext(connection) as queries:
        mine = client.get(f"/mgmt/v1/usage/?{window}").json()["results"]
    assert _tables(queries) == {"am_usage_daily"} and [r["requests"] for r in mine] == [5]
