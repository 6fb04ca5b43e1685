"""The admin at tablet width (768 px) in headless Chromium: the pages staff use most fit the screen (no sideways
scroll of the page; a wide list scrolls inside its own box), screenshots kept under test-output/screenshots/."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from apimgmt import services
from apimgmt.models import UsageHourlyTotal
from tests.support.browser import app_and_browser, require_chromium, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

PASSWORD = "root-pass-phrase-2024"


@pytest.fixture
def platform(transactional_db: Any, settings: Any) -> dict[str, str]:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    acme = services.tenant_create(id="acme", name="Acme Incorporated", actor=None)
    policy = services.policy_create(
        tenant=acme,
        name="standard-rate-limit",
        policy_type="rate_limiting",
        config={"requests_per_minute": 600},
        actor=None,
    )
    plan = services.plan_create(tenant=acme, name="starter", policies=[policy], actor=None)
    api = services.api_create(
        tenant=acme,
        api_name="orders-and-invoices",
        base_path="/commerce/orders-and-invoices/v2",
        upstream_url="https://orders-and-invoices.internal.example.com:8443/api",
        status="active",
        plans=[plan],
        actor=None,
    )
    app = services.consumer_create(tenant=acme, name="billing-service-production", actor=None)
    services.subscription_request(consumer=app, api=api, plan=plan, actor=None)
    services.api_key_create(consumer=app, name="ci", expires_at=timezone.now() + timedelta(days=3), actor=None)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for status, count in ((200, 900), (404, 40), (429, 12), (502, 3)):
        UsageHourlyTotal.objects.create(
            tenant=acme, dimension="tenant", value="", timestamp=hour, status_code=status, request_count=count
        )
    return {"api": api.pk, "policy": policy.pk}


def test_the_admin_fits_a_tablet(platform: dict[str, str], live_env: dict[str, str], tmp_path: Path) -> None:
    shots = screenshot_dir("admin-tablet")
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        page = browser.new_page(viewport={"width": 768, "height": 1024})
        page.set_default_timeout(10000)
        page.goto(f"{base}/admin/login/?next=/admin/")
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        playwright_sync.expect(page.get_by_role("heading", name="Traffic, last 24 hours")).to_be_visible()
        pages = {
            "home": "/admin/",
            "usage": "/admin/apimgmt/tenant/acme/usage/",
            "api": f"/admin/apimgmt/api/{platform['api']}/change/",
            "policy": f"/admin/apimgmt/policy/{platform['policy']}/change/",
            "apis": "/admin/apimgmt/api/",
            "subscriptions": "/admin/apimgmt/subscription/",
        }
        too_wide = {}
        for name, path in pages.items():
            page.goto(base + path)
            page.wait_for_load_state()
            page.screenshot(path=str(shots / f"{name}-768.png"), full_page=True)
            scroll, client = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            if scroll > client:
                too_wide[name] = scroll
        assert not too_wide, f"pages wider than the 768 px screen: {too_wide}"
        page.goto(base + "/admin/apimgmt/tenant/acme/usage/")
        heights = page.locator("svg.chart text.axis").evaluate_all(
            "els => els.map((el) => el.getBoundingClientRect().height)"
        )
        assert heights and min(heights) >= 9, heights
