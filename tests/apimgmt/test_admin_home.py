"""The admin home: per-tenant traffic of the last 24 h, approvals waiting, keys expiring, APIs failing, latest
audit events, each scoped like the rest of the admin; "View site" leads to the portals' landing page."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from apimgmt import services
from apimgmt.models import Api, Consumer, Tenant, UsageHourlyTotal, UsageRecord

pytestmark = pytest.mark.django_db


def _hour(tenant: Tenant, hours_ago: float, status: int, count: int) -> None:
    """One hour of a tenant's totals, as the usage flusher keeps them."""
    start = (timezone.now() - timedelta(hours=hours_ago)).replace(minute=0, second=0, microsecond=0)
    UsageHourlyTotal.objects.create(
        tenant=tenant, dimension="tenant", value="", timestamp=start, status_code=status, request_count=count
    )


def _row(html: str, testid: str) -> str:
    match = re.search(rf'data-tenant="{testid}">(.*?)</tr>', html, re.S)
    assert match, testid
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(1)))


@pytest.fixture
def platform(acme: Tenant, globex: Tenant, acme_api: Api, bob: User, bob_app: Consumer) -> dict[str, Any]:
    _hour(acme, 1, 200, 100)
    _hour(acme, 2, 500, 5)
    _hour(acme, 3, 429, 7)
    _hour(acme, 30, 200, 999)  # older than a day: not counted
    services.api_update(api=acme_api, subscription_approval="manual", actor=None)
    pending = services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    soon, _ = services.api_key_create(
        consumer=bob_app, name="soon", expires_at=timezone.now() + timedelta(days=3), actor=None
    )
    services.api_key_create(consumer=bob_app, name="later", expires_at=timezone.now() + timedelta(days=10), actor=None)
    rotated, _ = services.api_key_create(consumer=bob_app, name="rotated", actor=None)
    services.api_key_rotate(key=rotated, overlap_seconds=3600, actor=None)  # expires on purpose: not listed
    minute = timezone.now().replace(second=0, microsecond=0)
    UsageRecord.objects.create(tenant=acme, api_id=acme_api.pk, timestamp=minute, status_code=503, request_count=4)
    UsageRecord.objects.create(
        tenant=acme, api_id=acme_api.pk, timestamp=minute - timedelta(hours=1), status_code=502, request_count=50
    )
    return {"pending": pending, "soon": soon, "rotated": rotated}


def test_the_home_page_says_how_the_platform_is_doing(client: Client, staff: User, platform: dict[str, Any]) -> None:
    client.force_login(staff)
    html = client.get("/admin/").content.decode()
    assert _row(html, "acme").strip() == "Acme (acme) Usage · Portal 112 5 (4.5 %) 7"
    assert "No traffic yet" in _row(html, "globex")
    assert 'href="/admin/apimgmt/tenant/acme/usage/"' in html and 'href="/portal/acme/"' in html
    assert "Waiting for approval (1)" in html and "bob-app → users" in html
    assert "Keys expiring within 7 days (1)" in html
    assert platform["soon"].key_prefix in html and platform["rotated"].key_prefix not in html
    failing = html[html.index('data-testid="failing"') :]
    assert "users" in failing and "4 failed calls" in failing and "50 failed" not in failing
    audit = html[html.index('data-testid="audit"') :]
    assert "api_key.rotate" in audit
    # The models are still one click away, and "View site" leads somewhere.
    assert 'href="/admin/apimgmt/api/"' in html
    assert 'href="/portal/">View site' in html


def test_a_tenant_admin_sees_only_their_tenants(client: Client, platform: dict[str, Any], acme: Tenant) -> None:
    sam = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=sam, role="admin", actor=None)
    carol = User.objects.create_user("carol2", "c2@example.com", "carol-password-123", is_staff=True)
    carol.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    globex = Tenant.objects.get(pk="globex")
    services.membership_set(tenant=globex, user=carol, role="admin", actor=None)
    client.force_login(carol)
    html = client.get("/admin/").content.decode()
    assert 'data-tenant="acme"' not in html and 'data-tenant="globex"' in html
    assert "bob-app" not in html and platform["soon"].key_prefix not in html
    assert "Waiting for approval (0)" in html and "Every API answered normally." in html
    assert "acme" not in html[html.index('data-testid="audit"') :]
    client.force_login(sam)
    assert 'data-tenant="acme"' in client.get("/admin/").content.decode()


def test_the_portals_landing_page_lists_only_the_visitors_portals(
    client: Client, staff: User, bob: User, acme: Tenant, globex: Tenant
) -> None:
    anonymous = client.get("/portal/").content.decode()
    assert "Acme" not in anonymous and "Globex" not in anonymous and "Which portal?" in anonymous
    client.force_login(bob)
    page = client.get("/portal/").content.decode()
    assert 'href="/portal/acme/"' in page and "globex" not in page
    client.force_login(staff)
    page = client.get("/portal/").content.decode()
    assert 'href="/portal/acme/"' in page and 'href="/portal/globex/"' in page


def test_the_home_page_costs_the_same_queries_for_many_tenants(
    client: Client, staff: User, platform: dict[str, Any]
) -> None:
    client.force_login(staff)
    client.get("/admin/")  # warm: content types, session

    def count() -> int:
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as queries:
            assert client.get("/admin/").status_code == 200
        return len(queries)

    few = count()
    for i in range(8):
        tenant = services.tenant_create(id=f"t{i}", name=f"T{i}", actor=None)
        _hour(tenant, 1, 200, i + 1)
    assert count() == few


def test_a_tenant_without_traffic_says_so_instead_of_an_empty_chart(
    client: Client, staff: User, acme: Tenant, globex: Tenant
) -> None:
    client.force_login(staff)
    _hour(acme, 1, 200, 3)
    quiet = client.get("/admin/apimgmt/tenant/globex/usage/").content.decode()
    assert "No traffic yet." in quiet and '<svg class="chart"' not in quiet
    busy = client.get("/admin/apimgmt/tenant/acme/usage/").content.decode()
    assert "No traffic yet." not in busy and '<svg class="chart"' in busy
