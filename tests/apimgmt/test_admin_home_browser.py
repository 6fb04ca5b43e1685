"""The admin home in headless Chromium at 1280 and 390 px, with screenshots kept under
test-output/screenshots/admin-home/ (tests/support/browser.screenshot_dir)."""

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
def platform(transactional_db: Any, settings: Any) -> None:
    # The server checks the password with its own (production) hasher, not the tests' fast one.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    acme = services.tenant_create(id="acme", name="Acme", actor=None)
    services.tenant_create(id="globex", name="Globex Corporation", actor=None)
    api = services.api_create(
        tenant=acme,
        api_name="orders",
        base_path="/orders",
        upstream_url="https://orders.example.com",
        status="active",
        subscription_approval="manual",
        actor=None,
    )
    app = services.consumer_create(tenant=acme, name="billing-service", actor=None)
    services.subscription_request(consumer=app, api=api, actor=None)
    services.api_key_create(consumer=app, name="ci", expires_at=timezone.now() + timedelta(days=2), actor=None)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for status, count in ((200, 1200), (429, 31), (503, 4)):
        UsageHourlyTotal.objects.create(
            tenant=acme, dimension="tenant", value="", timestamp=hour, status_code=status, request_count=count
        )


def test_the_admin_home_at_1280_and_390_px(platform: None, live_env: dict[str, str], tmp_path: Path) -> None:
    shots = screenshot_dir("admin-home")
    expect = playwright_sync.expect
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        for name, viewport in (("1280", {"width": 1280, "height": 900}), ("390", {"width": 390, "height": 844})):
            context = browser.new_context(viewport=viewport)
            page = context.new_page()
            page.set_default_timeout(10000)
            page.goto(f"{base}/admin/login/?next=/admin/")
            page.get_by_label("Username").fill("root")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Traffic, last 24 hours")).to_be_visible()
            acme = page.locator('tr[data-tenant="acme"]')
            expect(acme).to_contain_text("1235")
            expect(acme).to_contain_text("31")
            expect(page.locator('tr[data-tenant="globex"]')).to_contain_text("No traffic yet")
            expect(page.get_by_role("heading", name="Waiting for approval (1)")).to_be_visible()
            expect(page.get_by_role("heading", name="Keys expiring within 7 days (1)")).to_be_visible()
            expect(page.get_by_test_id("audit")).to_contain_text("subscription.request")
            # The stylesheet arrived (CSP allows only files): the sections sit in a grid.
            expect(page.locator(".home-grid")).to_have_css("display", "grid")
            # Nothing of the overview reaches past the screen's edge (no sideways scrolling on a phone).
            too_wide = page.evaluate(
                """() => Array.from(document.querySelectorAll(".platform-home *"))
                  .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                  .map((el) => el.tagName + "." + el.className)"""
            )
            assert not too_wide, too_wide
            page.screenshot(path=str(shots / f"home-{name}.png"), full_page=True)
            page.get_by_role("link", name="View site").click()
            expect(page.get_by_role("heading", name="Developer portals")).to_be_visible()
            expect(page.get_by_role("link", name="Globex Corporation")).to_be_visible()
            page.screenshot(path=str(shots / f"portals-{name}.png"), full_page=True)
            context.close()
