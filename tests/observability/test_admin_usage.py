"""The admin's per-tenant usage overview: the last 24 h of requests, error rate, 429s, top APIs and consumers."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils.timezone import now

from apimgmt.models import Api, Consumer, Tenant
from apimgmt.usage import add_minute


def _record(tenant: Tenant, *, api: str, consumer: str, status: int, count: int, ago: timedelta) -> None:
    minute = (now() - ago).replace(second=0, microsecond=0)
    add_minute(
        tenant_id=tenant.id,
        api_id=api,
        consumer_id=consumer,
        key_id="",
        timestamp=minute,
        status_code=status,
        request_count=count,
        error_count=count if status >= 500 else 0,
    )


@pytest.fixture
def traffic(acme: Tenant, globex: Tenant, acme_api: Api, bob_app: Consumer) -> None:
    _record(acme, api=acme_api.id, consumer=bob_app.id, status=200, count=700, ago=timedelta(hours=1))
    _record(acme, api=acme_api.id, consumer=bob_app.id, status=502, count=100, ago=timedelta(hours=2))
    _record(acme, api="api_other", consumer="con_other", status=429, count=200, ago=timedelta(minutes=5))
    _record(acme, api=acme_api.id, consumer=bob_app.id, status=200, count=5000, ago=timedelta(hours=30))  # too old
    _record(globex, api="api_globex", consumer="con_globex", status=200, count=4242, ago=timedelta(hours=1))


def test_staff_see_a_tenants_last_24_hours(client: Client, staff: User, traffic: None, acme_api: Api) -> None:
    client.force_login(staff)
    page = client.get("/admin/apimgmt/tenant/acme/usage/").content.decode()

    assert re.search(r'class="usage-requests">1000<', page)
    assert re.search(r'class="usage-error-rate">10.0 %<', page)
    assert re.search(r'class="usage-rate-limited">200<', page)
    top_apis = page.split('class="usage-top-apis"')[1].split("</table>")[0]
    assert top_apis.index(acme_api.api_name) < top_apis.index("api_other"), "busiest first"
    assert "bob-app" in page.split('class="usage-top-consumers"')[1]
    assert "api_globex" not in page and "4242" not in page, "another tenant's traffic is not shown"
    # One bar per status class and hour with traffic (2xx, 5xx and 429 here), on axes with even ticks.
    assert page.count("<rect ") == 3
    assert ": 700 2xx and 3xx</title>" in page and ": 100 5xx</title>" in page
    assert ": 200 429 Too Many Requests</title>" in page
    # Each bar in the hour (UTC) its traffic was in, on an axis that ends at the current hour.
    titles = re.findall(r"<title>(\d\d:00): (\d+) ", page)
    hour = lambda ago: f"{now() - ago:%H}:00"  # noqa: E731
    assert titles == [
        (hour(timedelta(hours=2)), "100"),
        (hour(timedelta(hours=1)), "700"),
        (hour(timedelta(minutes=5)), "200"),
    ]
    hours = re.findall(r'text-anchor="middle">(\d\d:00)</text>', page)
    assert hours[-1] == hour(timedelta()), "the hour axis ends at the current hour"
    assert [int(t) for t in re.findall(r'text-anchor="end">(\d+)</text>', page)] == [0, 200, 400, 600, 800]
    assert "Hour (UTC)" in page and 'class="legend-item"' in page


def test_a_tenant_without_traffic_gets_an_empty_overview(client: Client, staff: User, acme: Tenant) -> None:
    client.force_login(staff)
    response = client.get("/admin/apimgmt/tenant/acme/usage/")
    assert response.status_code == 200
    assert "No traffic in the last 24 hours." in response.content.decode()


def test_unknown_tenant_is_404(client: Client, staff: User) -> None:
    client.force_login(staff)
    assert client.get("/admin/apimgmt/tenant/nope/usage/").status_code == 404


def test_only_platform_staff_may_see_it(client: Client, alice: User, traffic: None) -> None:
    client.force_login(alice)  # a tenant admin, not platform staff
    response = client.get("/admin/apimgmt/tenant/acme/usage/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_usage_page_is_linked_from_the_tenant_list(client: Client, staff: User, acme: Tenant) -> None:
    client.force_login(staff)
    listing = client.get("/admin/apimgmt/tenant/").content.decode()
    assert 'href="/admin/apimgmt/tenant/acme/usage/"' in listing


def test_scoped_staff_cannot_see_another_tenants_usage(client: Client, traffic: None, acme: Tenant) -> None:
    from django.contrib.auth.models import Permission

    from apimgmt import services

    user = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=user, role="admin", actor=None)
    client.force_login(user)
    assert client.get("/admin/apimgmt/tenant/acme/usage/").status_code == 200
    response = client.get("/admin/apimgmt/tenant/globex/usage/")
    assert response.status_code == 404
    assert "4242" not in response.content.decode() and "4,242" not in response.content.decode()


def test_websocket_connections_messages_and_bytes_are_shown_when_the_tenant_had_any(
    client: Client, staff: User, traffic: None, acme: Tenant, acme_api: Api, bob_app: Consumer
) -> None:
    client.force_login(staff)
    before = client.get("/admin/apimgmt/tenant/acme/usage/").content.decode()
    assert 'class="usage-websocket"' not in before and "Connected (s)" not in before, "no connection: no columns"

    minute = (now() - timedelta(minutes=10)).replace(second=0, microsecond=0)
    for key, connections, seconds, messages_in, messages_out in (("key_a", 2, 90.5, 30, 50), ("key_b", 1, 9.5, 4, 6)):
        add_minute(
            tenant_id=acme.id,
            api_id=acme_api.id,
            consumer_id=bob_app.id,
            key_id=key,
            timestamp=minute,
            status_code=101,
            request_count=connections,
            bytes_in=100 * messages_in,
            bytes_out=1000 * messages_out,
            connection_count=connections,
            connection_seconds=seconds,
            messages_in=messages_in,
            messages_out=messages_out,
        )
    add_minute(tenant_id=acme.id, api_id=acme_api.id, timestamp=minute, status_code=200, bytes_in=999, bytes_out=999)
    page = client.get("/admin/apimgmt/tenant/acme/usage/").content.decode()

    assert re.search(r'class="usage-connections">3<', page)
    assert re.search(r'class="usage-connection-seconds">100<', page)
    assert re.search(r'class="usage-messages-in">34<', page) and re.search(r'class="usage-messages-out">56<', page)
    # Only the connections' messages' bytes, not the requests' bodies.
    assert re.search(r'class="usage-ws-bytes-in">3400<', page) and re.search(r'class="usage-ws-bytes-out">56000<', page)
    top_apis = page.split('class="usage-top-apis"')[1].split("</table>")[0]
    assert "<th>Connections</th><th>Connected (s)</th><th>Messages in</th><th>Messages out</th>" in top_apis
    users = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", top_apis.split(acme_api.api_name)[1].split("</tr>")[0]))
    assert users.split() == [acme_api.id, "803", "100", "0", "3", "100", "34", "56", "3400", "56000"]
    assert "<th>Connections</th>" in page.split('class="usage-top-consumers"')[1].split("</table>")[0]


def test_usage_records_list_their_websocket_numbers(client: Client, staff: User, acme: Tenant) -> None:
    add_minute(
        tenant_id=acme.id,
        api_id="api_ws",
        timestamp=now(),
        status_code=101,
        request_count=1,
        bytes_in=123,
        bytes_out=456,
        connection_count=1,
        connection_seconds=42.5,
        messages_in=7,
        messages_out=9,
    )
    client.force_login(staff)
    listing = client.get("/admin/apimgmt/usagerecord/").content.decode()

    def cell(name: str) -> str:
        match = re.search(rf'class="field-{name}[^"]*"[^>]*>(.*?)</t[dh]>', listing, re.S)
        assert match, name
        return match.group(1).strip()

    assert [cell(n) for n in ("bytes_in", "bytes_out", "connection_count", "connected_seconds")] == [
        "123",
        "456",
        "1",
        "42.5",
    ]
    assert (cell("messages_in"), cell("messages_out")) == ("7", "9")
