"""Quota left as a bar of what is left ("0 of 5 left" is empty), "—" for a window with nothing to reset, and the
key, subscription and quota tables as labelled cards at phone width (checked in Chromium at 390 px)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

import apimgmt.echo
from apimgmt import services
from apimgmt.models import ApiKey, Consumer, Tenant, UsageRecord
from tests.gateway.conftest import InProcessGateway
from tests.support.browser import app_and_browser, require_chromium, screenshot_dir
from tests.support.servers import wsgi_server


@pytest.fixture
def echo_url() -> Iterator[str]:
    with wsgi_server(apimgmt.echo.app) as url:
        yield url


def _five_a_minute(acme: Tenant, bob: User, app: Consumer, echo_url: str) -> Any:
    limit = services.policy_create(
        tenant=acme,
        name="5-a-minute",
        policy_type="rate_limiting",
        config={"requests_per_minute": 5, "window_type": "fixed"},
        actor=None,
    )
    idle = services.policy_create(
        tenant=acme,
        name="idle-burst",
        policy_type="rate_limiting",
        config={"requests_per_hour": 1000, "window_type": "sliding"},
        actor=None,
    )
    api = services.api_create(
        tenant=acme,
        api_name="echo",
        base_path="/echo",
        upstream_url=echo_url,
        status="active",
        policies=[limit, idle],
        actor=None,
    )
    services.subscription_request(consumer=app, api=api, actor=bob)
    return api


@pytest.mark.django_db
def test_the_quota_bar_draws_what_is_left_and_an_idle_window_shows_a_dash(
    acme: Tenant,
    bob: User,
    bob_client: Client,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    echo_url: str,
    settings: Any,
    redis_client: Any,
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    api = _five_a_minute(acme, bob, bob_app, echo_url)
    usage = f"/portal/acme/apps/{bob_app.pk}/usage/?api={api.pk}"
    page = bob_client.get(usage).content.decode()
    fresh = page[page.index('aria-label="5 of 5 left"') :][:900]
    assert 'data-testid="left-bar" width="100"' in fresh
    assert 'data-label="Resets in" class="small">—</td>' in fresh
    idle = page[page.index('aria-label="1000 of 1000 left"') :][:900]
    assert re.search(r'data-label="Resets in" class="small">—</td>', idle), "an idle window has nothing to reset"

    gateway = InProcessGateway()
    statuses = [gateway.get("/echo/hello", headers={"X-API-Key": bob_key[1]}).status for _ in range(5)]
    assert statuses == [200] * 5
    page = bob_client.get(usage).content.decode()
    spent = page[page.index('aria-label="0 of 5 left"') :][:600]
    assert 'data-testid="left-bar" width="0"' in spent and "<strong>0</strong> of 5 left" in spent
    resets = re.search(r'data-label="Resets in" class="small">([^<]*)<', page[page.index('aria-label="0 of 5 left"') :])
    assert resets and re.fullmatch(r"\d+ s", resets.group(1)), "a spent window says when it refills"


@pytest.mark.django_db
def test_key_and_subscription_tables_label_every_cell_for_the_phone_layout(
    bob_client: Client,
    bob: User,
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    acme: Tenant,
    echo_url: str,
    settings: Any,
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    _five_a_minute(acme, bob, bob_app, echo_url)
    page = bob_client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    for table in ("subscriptions-table", "keys-table"):
        body = page[page.index(f'data-testid="{table}"') :]
        body = body[body.index("<tbody>") : body.index("</tbody>")]
        cells = re.findall(r"<td( [^>]*)?>", body)
        labelled = [c for c in cells if "data-label=" in (c or "")]
        assert len(labelled) >= len(cells) - 1, table  # all but the actions cell say which column they are


PASSWORD = "phone-pass-phrase-2024"


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_at_390_px_keys_subscriptions_and_quotas_are_cards_with_every_control_in_view(
    transactional_db: Any, settings: Any, live_env: dict[str, str], tmp_path: Path, echo_url: str
) -> None:
    require_chromium()
    playwright_sync = pytest.importorskip("playwright.sync_api")
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    acme = services.tenant_create(id="acme", name="Acme", actor=None)
    grace = User.objects.create_user("grace", "grace@example.com", PASSWORD)
    services.membership_set(tenant=acme, user=grace, role="developer", actor=None)
    app = services.consumer_create(tenant=acme, name="weather-station-backend", owner=grace, actor=grace)
    _five_a_minute(acme, grace, app, echo_url)
    for name in ("production", "staging"):
        services.api_key_create(consumer=app, name=name, actor=grace)
    minute = timezone.now().replace(second=0, microsecond=0) - timedelta(hours=2)
    UsageRecord.objects.create(tenant=acme, consumer_id=app.pk, timestamp=minute, status_code=200, request_count=12345)
    shots = screenshot_dir("portal-phone-tables")
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.set_default_timeout(10000)
        page.goto(f"{base}/portal/acme/login/?next=/portal/acme/apps/{app.pk}/")
        page.get_by_label("User name").fill("grace")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        playwright_sync.expect(page.get_by_role("heading", name="API keys")).to_be_visible()

        def in_view(locator: Any) -> None:
            for i in range(locator.count()):
                box = locator.nth(i).bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (locator, box)

        in_view(page.get_by_role("link", name="Rotate"))
        in_view(page.get_by_role("link", name="Revoke"))
        in_view(page.locator('[data-testid="keys-table"] td[data-label="Status"] .badge'))
        in_view(page.locator('[data-testid="subscriptions-table"] td[data-label="Status"] .badge'))
        assert page.get_by_role("link", name="Rotate").count() == 2
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        page.screenshot(path=str(shots / "app-390.png"), full_page=True)

        page.get_by_role("link", name="Usage", exact=True).click()
        # The chart's axis labels stay readable on a phone (the chart is scaled to the screen's width).
        heights = page.locator("svg.chart text.axis").evaluate_all(
            "els => els.map((el) => el.getBoundingClientRect().height)"
        )
        assert heights and min(heights) >= 9, heights
        clipped = page.locator("svg.chart").first.evaluate(
            """svg => { const box = svg.getBoundingClientRect();
                return Array.from(svg.querySelectorAll("text.axis")).map((t) => [t.textContent, t.getBoundingClientRect()])
                  .filter(([, r]) => r.left < box.left - 0.5 || r.right > box.right + 0.5).map(([text]) => text); }"""
        )
        assert not clipped, f"axis labels cut off at the chart's edge: {clipped}"
        table = page.get_by_test_id("quota-table")
        playwright_sync.expect(table).to_be_visible()
        in_view(table.locator('td[data-label="Left"]'))
        in_view(table.locator('td[data-label="Resets in"]'))
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        page.screenshot(path=str(shots / "usage-390.png"), full_page=True)
