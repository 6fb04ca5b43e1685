"""The API page's "How to call it" in headless Chromium at 1280 and 390 px: a key-or-JWT API with a long issuer URL
stays readable on a phone (no sideways scroll outside the curl box). Screenshots under test-output/screenshots/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apimgmt import services
from apimgmt.models import Api
from tests.support.browser import app_and_browser, require_chromium, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
LONG_ISSUER = "https://login.identity-provider.example.com/tenants/8f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b/v2.0/"

# Elements whose right edge passes the viewport (the ones that would make a phone scroll sideways).
_OVERFLOWING = """() => Array.from(document.querySelectorAll("body *"))
  .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
  .filter((el) => !el.closest(".snippet"))
  .map((el) => `${el.tagName.toLowerCase()}.${el.className}`)"""


@pytest.fixture
def jwt_api(transactional_db: Any, settings: Any) -> Api:
    tenant = services.tenant_create(id="demo", name="Demo Co", actor=None)
    issuer = services.jwt_issuer_create(
        tenant=tenant,
        name="corporate",
        issuer=LONG_ISSUER,
        audiences=["api://8f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b", "https://api.demo.example.com"],
        jwks_url="https://login.identity-provider.example.com/discovery/v2.0/keys",
        consumer_claim="azp",
        token_in_query="access_token",
        actor=None,
    )
    return services.api_create(
        tenant=tenant,
        api_name="Orders",
        base_path="/orders/v1",
        upstream_url="https://orders.example.com",
        status="active",
        auth_method="key_or_jwt",
        jwt_issuers=[issuer],
        actor=None,
    )


def test_how_to_call_reads_on_a_desktop_and_a_phone(jwt_api: Api, live_env: dict[str, str], tmp_path: Path) -> None:
    shots = screenshot_dir("portal-how-to-call")
    expect = playwright_sync.expect
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        for name, viewport in WIDTHS.items():
            page = browser.new_context(viewport=viewport).new_page()
            page.set_default_timeout(10000)
            page.goto(f"{base}/portal/demo/apis/{jwt_api.pk}/")
            section = page.get_by_test_id("how-to-call")
            expect(section).to_contain_text("Authorization: Bearer <token>")
            expect(section).to_contain_text(LONG_ISSUER)
            expect(section).to_contain_text("?access_token=<token>")
            expect(page.get_by_test_id("curl")).to_contain_text('curl -H "Authorization: Bearer $TOKEN"')
            assert not page.evaluate(_OVERFLOWING), (name, page.evaluate(_OVERFLOWING))
            width = page.evaluate("document.documentElement.clientWidth")
            assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name}: the page scrolls sideways"
            section.screenshot(path=str(shots / f"how-to-call-{name}.png"))
