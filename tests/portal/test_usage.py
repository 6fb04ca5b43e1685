"""The usage page: hourly and daily charts from am_usage_records, and quota left from the gateway's own counters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

import apimgmt.echo
from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Tenant
from apimgmt.usage import add_minute
from tests.gateway.conftest import InProcessGateway
from tests.support.servers import wsgi_server


def _record(app: Consumer, api_id: str, minutes_ago: int, status: int, count: int, errors: int = 0) -> None:
    bucket = (timezone.now() - timedelta(minutes=minutes_ago)).replace(second=0, microsecond=0)
    add_minute(
        tenant_id=app.tenant_id,
        api_id=api_id,
        consumer_id=app.pk,
        key_id="key_x",
        timestamp=bucket,
        status_code=status,
        request_count=count,
        error_count=errors,
    )


def test_usage_shows_requests_errors_and_429s_per_hour_and_day(
    bob_client: Client, bob_app: Consumer, acme_api: Api, bob: User
) -> None:
    services.subscription_request(consumer=bob_app, api=acme_api, actor=bob)
    _record(bob_app, acme_api.pk, 5, 200, 40)
    _record(bob_app, acme_api.pk, 65, 500, 3, errors=3)
    _record(bob_app, acme_api.pk, 66, 429, 7, errors=7)
    _record(bob_app, acme_api.pk, 3 * 24 * 60, 200, 100)  # three days ago: daily chart only
    other = services.consumer_create(tenant=bob_app.tenant, name="someone-else", actor=None)
    _record(other, acme_api.pk, 5, 200, 999)

    page = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/usage/").content.decode()
    assert 'data-testid="requests-24h">50<' in page
    assert 'data-testid="requests-30d">150<' in page
    assert "10 errors" in page and "7 429 too many requests" in page  # the chart's accessible title
    assert page.count("<svg") == 2 and "999" not in page

    filtered = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/usage/?api={acme_api.pk}")
    assert 'data-testid="requests-24h">50<' in filtered.content.decode()


def test_usage_of_an_api_the_app_never_subscribed_is_not_found(
    bob_client: Client, bob_app: Consumer, acme_api: Api
) -> None:
    assert bob_client.get(f"/portal/acme/apps/{bob_app.pk}/usage/?api={acme_api.pk}").status_code == 404


def test_an_app_without_traffic_gets_empty_states(bob_client: Client, bob_app: Consumer) -> None:
    page = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/usage/").content.decode()
    assert "No calls in the last 24 hours" in page and "No rate limits or quotas apply" in page


@pytest.fixture
def echo_url() -> Iterator[str]:
    with wsgi_server(apimgmt.echo.app) as url:
        yield url


@pytest.mark.django_db
@pytest.mark.parametrize("window_type", ["fixed", "sliding"])
def test_quota_left_matches_what_the_gateway_counted(
    window_type: str,
    acme: Tenant,
    bob: User,
    bob_client: Client,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    echo_url: str,
    settings: Any,
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    limit = services.policy_create(
        tenant=acme,
        name="per-minute",
        policy_type="rate_limiting",
        actor=None,
        config={"requests_per_minute": 10, "key_extraction": "consumer_id", "window_type": window_type},
    )
    daily = services.policy_create(
        tenant=acme,
        name="daily",
        policy_type="quota",
        actor=None,
        config={"requests_per_day": 100},
    )
    plan = services.plan_create(tenant=acme, name="Starter", policies=[daily], actor=None)
    api = services.api_create(
        tenant=acme,
        api_name="echo",
        base_path="/echo",
        upstream_url=echo_url,
        status="active",
        policies=[limit],
        actor=None,
    )
    services.subscription_request(consumer=bob_app, api=api, plan=plan, actor=bob)
    gateway = InProcessGateway()
    for _ in range(3):
        response = gateway.get("/echo/hello", headers={"X-API-Key": bob_key[1]})
        assert response.status == 200, response.body

    page = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/usage/?api={api.pk}").content.decode()
    assert 'aria-label="7 of 10 left"' in page, page[page.find("quota-h") :][:3000]
    assert 'aria-label="97 of 100 left"' in page


def _remaining_by_window(header: str) -> dict[str, int]:
    """'"name.label";r=7;t=60, ...' (the gateway's RateLimit header) -> {"name.label": 7, ...}."""
    found = {}
    for item in header.split(", "):
        name, *params = item.split(";")
        found[name.strip('"')] = int(next(p for p in params if p.startswith("r="))[2:])
    return found


@pytest.mark.django_db
@pytest.mark.parametrize("scope", ["consumer_id", "key_id", "api", "tenant_id"])
def test_quota_left_and_the_gateways_counters_agree_for_every_scope_and_window_type(
    scope: str, acme: Tenant, bob: User, bob_app: Consumer, bob_key: tuple[ApiKey, str], echo_url: str, settings: Any
) -> None:
    """The portal reads exactly the counters the gateway counts in: same windows, same scope, same arithmetic."""
    from portal.quota import quota_left

    settings.UPSTREAM_ALLOW_PRIVATE = True
    policies = [
        services.policy_create(
            tenant=acme,
            name=f"{window_type}-{scope}",
            policy_type="rate_limiting",
            actor=None,
            # Per hour: a sliding bucket refills one request per 7.2 s, so the portal's read moments later agrees.
            config={"requests_per_hour": 500, "key_extraction": scope, "window_type": window_type, **extra},
        )
        for window_type, extra in (("sliding", {"burst_size": 5}), ("fixed", {}))
    ]
    quota = services.policy_create(
        tenant=acme,
        name=f"quota-{scope}",
        policy_type="quota",
        actor=None,
        config={"requests_per_day": 1000, "requests_per_month": 20000, "key_extraction": scope},
    )
    api = services.api_create(
        tenant=acme,
        api_name="echo",
        base_path="/echo",
        upstream_url=echo_url,
        status="active",
        policies=[*policies, quota],
        actor=None,
    )
    services.subscription_request(consumer=bob_app, api=api, actor=bob)
    # A second app on the same API: it shares the api- and tenant-scoped counters, never the others.
    other = services.consumer_create(tenant=acme, name="other-app", actor=None)
    services.subscription_request(consumer=other, api=api, actor=None)
    _, other_key = services.api_key_create(consumer=other, actor=None)
    gateway = InProcessGateway()
    for _ in range(2):
        assert gateway.get("/echo/x", headers={"X-API-Key": other_key}).status == 200
    for _ in range(3):
        last = gateway.get("/echo/x", headers={"X-API-Key": bob_key[1]})
        assert last.status == 200, last.body
    counted = _remaining_by_window(last.header("RateLimit") or "")
    assert len(counted) == 4  # sliding.hour, fixed.hour, quota.day, quota.month

    report = quota_left(app=bob_app, apis=[api])
    assert report.available
    shown = {f"{row.policy_name}.{row.window}": row.remaining for row in report.rows}
    assert shown == counted
    used = 5 if scope in ("api", "tenant_id") else 3
    assert shown[f"quota-{scope}.day"] == 1000 - used
    assert shown[f"fixed-{scope}.hour"] == 500 - used
    assert shown[f"sliding-{scope}.hour"] == 505 - used
