"""Every kind of control-plane page works under its Content-Security-Policy in headless Chromium, under gunicorn.

The portal (sign-in, the API page with Swagger UI, the new key and its copy button, the usage meter), the Django
admin (login, a changelist, a change form, a new key shown once and copied) and the management API's Swagger UI and
ReDoc: no CSP violation, no console message, no uncaught exception, and each page still does its job.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User

import apimgmt.echo
from apimgmt import services
from apimgmt.models import Api, Consumer, Tenant
from tests.support.browser import app_and_browser, publish_echo_api, require_chromium
from tests.support.servers import wsgi_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

PASSWORD = "csp-pass-phrase-2024"

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

# Reports every violation to the test, from the first script of each document on.
LISTEN_FOR_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolation(`${location.pathname}: ${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`
    + ` (${event.sourceFile}:${event.lineNumber} ${event.sample})`);
});
"""


@dataclass
class Cast:
    tenant: Tenant
    api: Api
    app: Consumer
    developer: User
    staff: User


@dataclass
class Complaints:
    """What the browser says about the pages: CSP violations, console messages, uncaught exceptions."""

    heard: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.expose_function("cspViolation", lambda text: self.heard.append(f"violation {text}"))
        page.add_init_script(LISTEN_FOR_VIOLATIONS)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.heard.append(f"uncaught {error}"))

    def _console(self, message: Any) -> None:
        if message.type not in ("debug", "verbose"):  # Chromium's own hints; the pages log nothing at all
            self.heard.append(f"console {message.type} on {message.location.get('url')}: {message.text}")

    def await_violation(self, page: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(c.startswith("violation") for c in self.heard) and time.monotonic() < deadline:
            page.wait_for_timeout(50)

    def take(self) -> list[str]:
        heard, self.heard = self.heard, []
        return heard


@pytest.fixture
def cast(transactional_db: Any, settings: Any) -> Iterator[Cast]:
    """Tenant demo: an API with OpenAPI docs behind the echo upstream, on a plan with a daily quota of 4; grace's
    app subscribed to it; a staff user for the admin."""
    settings.UPSTREAM_ALLOW_PRIVATE = True
    # The server under gunicorn is not under test: it checks passwords with Django's default hashers, not MD5.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    with wsgi_server(apimgmt.echo.app) as echo_url:
        tenant = services.tenant_create(id="demo", name="Demo Co", actor=None)
        quota = services.policy_create(
            tenant=tenant, name="daily", policy_type="quota", config={"requests_per_day": 4}, actor=None
        )
        plan = services.plan_create(tenant=tenant, name="Free", policies=[quota], actor=None)
        api = publish_echo_api(tenant, echo_url)
        developer = User.objects.create_user("grace", "grace@example.com", PASSWORD)
        services.membership_set(tenant=tenant, user=developer, role="developer", actor=None)
        app = services.consumer_create(tenant=tenant, name="grace-weather", owner=developer, actor=developer)
        services.subscription_request(consumer=app, api=api, plan=plan, actor=developer)
        staff = User.objects.create_superuser("root", "root@example.com", PASSWORD)
        yield Cast(tenant, api, app, developer, staff)


def _strict(response: Any) -> None:
    assert response is not None
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self';" in policy and "style-src 'self';" in policy, policy


def _inject_inline_script(page: Any) -> None:
    page.evaluate(
        "() => { const s = document.createElement('script'); s.text = 'window.ran = 1'; document.head.append(s); }"
    )


def test_control_plane_pages_work_without_a_single_csp_violation(
    cast: Cast, live_env: dict[str, str], tmp_path: Path
) -> None:
    complaints = Complaints()
    expect = playwright_sync.expect
    with app_and_browser(
        {**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool"), "GATEWAY_CONFIG_POLL_SECONDS": "0.1"},
        tmp_path / "gunicorn.log",
    ) as (base, browser):
        context = browser.new_context(
            viewport={"width": 1200, "height": 800}, permissions=["clipboard-read", "clipboard-write"]
        )
        page = context.new_page()
        page.set_default_timeout(15000)
        complaints.watch(page)
        portal = f"{base}/portal/demo"

        # The listener hears a violation: an inline script added to a portal page is refused.
        _strict(page.goto(f"{portal}/login/"))
        _inject_inline_script(page)
        expect(page.get_by_role("heading", name=re.compile("Sign in"))).to_be_visible()
        complaints.await_violation(page)
        assert page.evaluate("window.ran") is None
        heard = complaints.take()
        assert any(c.startswith("violation /portal/demo/login/: script-src-elem blocked inline") for c in heard), heard

        # Portal: sign in. DEBUG is off, so the cookies are Secure and carry the __Host- prefix.
        page.get_by_label("User name").fill("grace")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("link", name="grace-weather")).to_be_visible()
        assert {"__Host-sessionid", "__Host-csrftoken"} <= {cookie["name"] for cookie in context.cookies()}
        assert complaints.take() == []

        # The catalog and the API's page, where Swagger UI renders the OpenAPI document.
        _strict(page.goto(f"{portal}/"))
        page.get_by_role("link", name="Echo").first.click()
        expect(page.locator("#swagger-ui .opblock-summary-path")).to_contain_text("/hello")
        page.locator("#swagger-ui .opblock-summary").first.click()  # expands the operation
        expect(page.locator("#swagger-ui .responses-wrapper")).to_be_visible()
        assert complaints.take() == []

        # A new key and its copy button.
        _strict(page.goto(f"{portal}/apps/{cast.app.pk}/keys/new/"))
        page.get_by_label("Key name").fill("laptop")
        page.get_by_role("button", name="Create key").click()
        key = page.get_by_test_id("new-key").input_value()
        page.get_by_role("button", name="Copy", exact=True).click()
        expect(page.get_by_text("Copied to the clipboard.")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == key
        assert complaints.take() == []

        # One call through the gateway; the usage page's meter shows a quarter of the daily quota used.
        deadline = time.monotonic() + 5
        while (status := requests.get(f"{base}/echo/hello", headers={"X-API-Key": key}, timeout=10).status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)  # the new key reaches every worker within a second
        _strict(page.goto(f"{portal}/apps/{cast.app.pk}/usage/"))
        meter = page.get_by_role("meter", name="3 of 4 left")
        expect(meter).to_be_visible()
        left, whole = meter.locator("rect").bounding_box(), meter.bounding_box()
        assert left is not None and whole is not None
        assert left["width"] == pytest.approx(whole["width"] * 3 / 4, abs=2)  # the bar draws what is left
        assert complaints.take() == []

        # Django admin: login, the API list (filters, select-all), a change form, a key shown once and copied.
        _strict(page.goto(f"{base}/admin/login/"))
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        page.goto(f"{base}/admin/apimgmt/api/")
        expect(page.get_by_text("Active", exact=True).first).to_have_css("color", "rgb(46, 125, 50)")  # the badge
        page.locator("#action-toggle").check()
        expect(page.locator(".action-counter")).to_contain_text("1 of 1 selected")
        page.get_by_role("link", name="Echo").click()
        expect(page.get_by_role("heading", name=re.compile("Change API"))).to_be_visible()
        _strict(page.goto(f"{base}/admin/apimgmt/apikey/add/"))
        page.get_by_label("Consumer").select_option(value=cast.app.pk)
        page.get_by_label("Name").fill("ci")
        page.get_by_role("button", name="Save", exact=True).click()
        secret = page.locator("code[id^=secret-]").inner_text()
        page.get_by_role("button", name="Copy", exact=True).click()
        expect(page.get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == secret
        _inject_inline_script(page)  # the page has the strict policy: inline script never runs
        complaints.await_violation(page)
        assert page.evaluate("window.ran") is None
        heard = complaints.take()
        # Only the injected <script> was refused: the copy button (apimgmt/static/apimgmt/copy.js) raised nothing.
        assert sorted(c.split(":")[0] for c in heard) == ["console error on ", "violation /admin/apimgmt/apikey/add/"]
        assert all("inline script" in c or "script-src-elem blocked inline" in c for c in heard), heard

        # The management API's docs: Swagger UI and ReDoc, each with the exception its template needs.
        swagger = page.goto(f"{base}/mgmt/docs/")
        assert swagger is not None and "script-src 'self';" in swagger.headers["content-security-policy"]
        # Both renderers build the page from the whole schema in the browser: seconds on a loaded machine.
        expect(page.locator("#swagger-ui .opblock-summary-path").first).to_be_visible(timeout=30_000)
        assert complaints.take() == []
        redoc = page.goto(f"{base}/mgmt/redoc/")
        assert redoc is not None and "script-src 'self';" in redoc.headers["content-security-policy"]
        expect(page.get_by_role("heading", name=re.compile("apimgmt management API"))).to_be_visible(timeout=30_000)
        page.get_by_placeholder("Search...").fill("tenant")  # searched in ReDoc's blob: worker
        expect(page.locator("[role=search] li").first).to_be_visible(timeout=30_000)
        # ReDoc asks Google Fonts for a stylesheet and Redocly's CDN for a logo; both are blocked on purpose.
        third_party = ("fonts.googleapis.com", "cdn.redoc.ly")
        assert [c for c in complaints.take() if not any(host in c for host in third_party)] == []
