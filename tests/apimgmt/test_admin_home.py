"""The admin home: per-tenant traffic of the last 24 h, approvals waiting, keys expiring, open circuits (as the
gateways announce them) apart from failing upstreams, latest audit events, each scoped like the rest of the admin;
"View site" leads to the portals' landing page."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from apimgmt import circuit_events, services
from apimgmt.models import Api, Consumer, Tenant, UsageHourlyTotal, UsageRecord
from gateway.resilience import CircuitAnnouncer, _Change

pytestmark = pytest.mark.django_db


def _hour(tenant: Tenant, hours_ago: float, status: int, count: int) -> None:
    """One hour of a tenant's totals, as the usage flusher keeps them."""
    start = (timezone.now() - timedelta(hours=hours_ago)).replace(minute=0, second=0, microsecond=0)
    UsageHourlyTotal.objects.create(
        tenant=tenant, dimension="tenant", value="", timestamp=start, status_code=status, request_count=count
    )


def _minute(tenant: Tenant, api: Api, minute: Any, status: int, count: int, upstream_ms: float = 0.0) -> None:
    UsageRecord.objects.create(
        tenant=tenant,
        api_id=api.pk,
        timestamp=minute,
        status_code=status,
        request_count=count,
        error_count=count,
        upstream_latency_ms_sum=upstream_ms * count,
    )


def _announce(api: Api, state: str) -> None:
    """What a gateway worker whose breaker changed state runs (gateway/resilience.py), on this test's Redis."""
    CircuitAnnouncer().announce(_Change(api.tenant_id, api.pk, state, timezone.now().timestamp(), 30.0))


def _section(html: str, testid: str) -> str:
    start = html.index(f'data-testid="{testid}"')
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[start : html.index("</section>", start)]))
    return re.sub(r" ([:,])", r"\1", text)


@contextmanager
def redis_commands(client: Any) -> Iterator[list[str]]:
    """The commands sent to this test's Redis database while the block runs, as MONITOR shows them (the server is
    shared with other databases, so its command statistics would count their calls too)."""
    db = client.connection_pool.connection_kwargs.get("db", 0)
    marker = f"end-{uuid.uuid4().hex}"
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            for entry in monitor.listen():
                if marker in entry["command"]:
                    return
                if int(entry.get("db", -1)) == db and entry["command"] != "PING":
                    seen.append(entry["command"])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.2)  # MONITOR is on before the block's first command
    yield seen
    client.echo(marker)
    thread.join(10)
    assert not thread.is_alive()


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
    # The gateway's 503s with no upstream time (an open circuit, a limit store down) are not the upstream's.
    UsageRecord.objects.create(tenant=acme, api_id=acme_api.pk, timestamp=minute, status_code=503, request_count=40)
    _minute(acme, acme_api, minute, 504, 3)  # too slow
    _minute(acme, acme_api, minute, 500, 1, upstream_ms=8.0)  # the upstream's own error
    _minute(acme, acme_api, minute - timedelta(hours=1), 502, 50)  # too long ago
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
    failing = _section(html, "failing")
    assert "users · acme: 4 failed calls" in failing and "50 failed" not in failing and "40" not in failing
    assert "5xx from the upstream in the last 15 minutes" in failing and "circuit" not in failing
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
    assert "Waiting for approval (0)" in html and "Every upstream answered normally." in html
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


def test_an_open_circuit_is_listed_apart_from_failing_upstreams(
    client: Client, staff: User, platform: dict[str, Any], acme: Tenant, acme_api: Api, globex: Tenant
) -> None:
    orders = services.api_create(
        tenant=acme, api_name="orders", base_path="/api/orders", upstream_url="https://orders.example.com", actor=None
    )
    billing = services.api_create(
        tenant=globex, api_name="billing", base_path="/api/billing", upstream_url="https://b.example.com", actor=None
    )
    client.force_login(staff)
    assert "No circuit is open." in _section(client.get("/admin/").content.decode(), "circuits")

    _announce(orders, circuit_events.OPEN)
    _announce(billing, circuit_events.OPEN)
    html = client.get("/admin/").content.decode()
    circuits = _section(html, "circuits")
    assert "orders · acme: circuit open" in circuits and "billing · globex: circuit open" in circuits
    assert "users" not in circuits, "users fails (listed below) but its circuit was never announced open"
    assert f'href="/admin/apimgmt/api/{orders.pk}/change/"' in html
    assert "orders" not in _section(html, "failing"), "an open circuit is not an upstream answer"

    _announce(orders, circuit_events.CLOSED)
    circuits = _section(client.get("/admin/").content.decode(), "circuits")
    assert "orders" not in circuits and "billing · globex: circuit open" in circuits

    # A tenant admin sees only their tenants' circuits.
    sam = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=sam, role="admin", actor=None)
    _announce(orders, circuit_events.OPEN)
    client.force_login(sam)
    circuits = _section(client.get("/admin/").content.decode(), "circuits")
    assert "orders · acme: circuit open" in circuits and "billing" not in circuits


def test_circuits_cost_one_redis_call_per_announcing_tenant_not_per_api(
    client: Client, staff: User, acme: Tenant, redis_client: Any
) -> None:
    apis = [
        services.api_create(
            tenant=acme, api_name=f"a{i}", base_path=f"/api/a{i}", upstream_url="https://a.example.com", actor=None
        )
        for i in range(6)
    ]
    for api in apis[:3]:
        _announce(api, circuit_events.OPEN)
    client.force_login(staff)
    client.get("/admin/")
    with redis_commands(redis_client) as seen:
        html = client.get("/admin/").content.decode()
    circuit_calls = [command.split()[0].upper() for command in seen if "circuit" in command]
    assert circuit_calls == ["SMEMBERS", "MGET"], seen
    assert len(next(c for c in seen if c.startswith("MGET")).split()) == 1 + len(apis)
    assert _section(html, "circuits").count("circuit open") == 3


def test_when_redis_does_not_answer_the_circuits_are_said_to_be_unknown(
    client: Client, staff: User, platform: dict[str, Any], settings: Any
) -> None:
    from tests.support.servers import free_port

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client.force_login(staff)
    response = client.get("/admin/")
    assert response.status_code == 200
    circuits = _section(response.content.decode(), "circuits")
    assert "Circuit states are unknown right now: Redis did not answer." in circuits
    assert "No circuit is open." not in circuits


def test_a_tenant_whose_traffic_is_older_than_a_day_is_not_said_to_have_none_yet(
    client: Client, staff: User, acme: Tenant, globex: Tenant
) -> None:
    _hour(globex, 30, 200, 5)
    client.force_login(staff)
    html = client.get("/admin/").content.decode()
    assert _row(html, "globex").strip().endswith("No traffic in the last 24 h 0 0")
    assert "No traffic yet" in _row(html, "acme") and "last 24 h" not in _row(html, "acme")
