"""The whole developer journey in headless Chromium against the app under gunicorn, with screenshots of each step.

sign up → verify (link from the mail) → sign in → create an app → subscribe it to the demo API → create a key →
read it from the page → call the gateway with it (200) → flush usage → the usage page shows the call → revoke →
the gateway refuses the key.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.management import get_commands

import apimgmt.echo
from apimgmt import services
from apimgmt.models import Api, Tenant
from tests.support.browser import app_and_browser, publish_echo_api, require_chromium
from tests.support.servers import ROOT, wsgi_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

PASSWORD = "journey-pass-phrase-2024"

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")


class Shots:
    """Numbered full-page screenshots under the test's output folder."""

    def __init__(self, page: Any, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.folder / f"{self.count:02d}-{name}.png"), full_page=True)


@pytest.fixture
def demo(transactional_db: Any, settings: Any) -> Iterator[tuple[Tenant, Api]]:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    with wsgi_server(apimgmt.echo.app) as echo_url:
        tenant = services.tenant_create(id="demo", name="Demo Co", open_signup=True, actor=None)
        services.plan_create(tenant=tenant, name="Free", description="Auto-approved", actor=None)
        api = publish_echo_api(tenant, echo_url)
        yield tenant, api


SITE_URL = "https://portal.example.test"


def _mail_link(mail_dir: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(mail_dir.glob("*.log")):
            match = re.search(r"https?://\S+/verify/\S+/", path.read_text())
            if match:
                return match.group(0)
        time.sleep(0.1)
    raise AssertionError(f"no verification mail in {mail_dir}")


def _call(base: str, key: str) -> requests.Response:
    return requests.get(f"{base}/echo/hello", headers={"X-API-Key": key}, timeout=10)


def _gateway_is_live(base: str) -> bool:
    # A real gateway answers a keyless call to an API with 401; the placeholder lets Django answer 404.
    return requests.get(f"{base}/echo/hello", timeout=10).status_code == 401


def test_a_developer_goes_from_sign_up_to_a_first_call_and_back(
    demo: tuple[Tenant, Api], live_env: dict[str, str], tmp_path: Path
) -> None:
    mail_dir = tmp_path / "mail"
    shots_dir = tmp_path / "screenshots"
    env = {
        **live_env,
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "EMAIL_FILE_PATH": str(mail_dir),
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "GATEWAY_CONFIG_POLL_SECONDS": "0.1",
        "SITE_URL": SITE_URL,
    }
    print(f"screenshots: {shots_dir}")
    skipped: list[str] = []
    with app_and_browser(env, tmp_path / "gunicorn.log") as (base, browser):
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_default_timeout(10000)
        shot = Shots(page, shots_dir)
        expect = playwright_sync.expect

        # Sign up.
        page.goto(f"{base}/portal/demo/")
        expect(page.get_by_role("heading", name="APIs")).to_be_visible()
        shot("catalog")
        page.get_by_role("link", name="Sign up to get a key").click()
        page.get_by_label("User name").fill("grace")
        page.get_by_label("E-mail").fill("grace@example.com")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        page.get_by_label("Password confirmation").fill(PASSWORD)
        shot("signup")
        page.get_by_role("button", name="Create account").click()
        expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
        shot("check-inbox")

        # Verify with the link from the mail: built from SITE_URL, followed on this server's free port.
        link = _mail_link(mail_dir)
        assert link.startswith(f"{SITE_URL}/portal/demo/verify/")
        page.goto(base + link.removeprefix(SITE_URL))
        shot("verify")
        page.get_by_role("button", name="Confirm my e-mail address").click()
        expect(page.get_by_text("Your e-mail address is confirmed")).to_be_visible()

        # Sign in.
        page.get_by_label("User name").fill("grace")
        page.get_by_label("Password").fill(PASSWORD)
        shot("login")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="No apps yet")).to_be_visible()
        shot("apps-empty")

        # Create an app.
        page.get_by_role("link", name="Create your first app").click()
        page.get_by_label("App name").fill("grace-weather")
        page.get_by_role("button", name="Create app").click()
        expect(page.get_by_role("heading", name="grace-weather")).to_be_visible()
        shot("app-created")

        # Subscribe it to the demo API, from the API's page (with its docs).
        page.get_by_role("link", name="APIs", exact=True).click()
        page.get_by_role("link", name="Echo").first.click()
        expect(page.locator("#swagger-ui .opblock-summary-path")).to_contain_text("/hello", timeout=15000)
        shot("api-docs")
        page.get_by_label("App").select_option(label="grace-weather")
        page.get_by_role("button", name="Subscribe").click()
        expect(page.get_by_text("is subscribed to Echo")).to_be_visible()
        shot("subscribed")

        # Create a key and read it from the page.
        page.get_by_role("link", name="Create key").click()
        page.get_by_label("Key name").fill("laptop")
        page.get_by_role("button", name="Create key").click()
        expect(page.get_by_text("you won't see this key again")).to_be_visible()
        key = page.get_by_test_id("new-key").input_value()
        assert key.startswith("ak_live_") and len(key) == 46
        shot("key-shown-once")
        page.get_by_role("link", name=re.compile("back to grace-weather")).click()
        assert key not in page.content()
        shot("app-with-key")

        # Call the gateway with it.
        gateway_live = _gateway_is_live(base)
        if gateway_live:
            deadline = time.monotonic() + 5
            response = _call(base, key)
            while response.status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)  # the subscription reaches every worker within a second
                response = _call(base, key)
            assert response.status_code == 200, response.text
            assert response.json()["path"] == "/hello"
        else:
            skipped.append("the gateway is still a pass-through placeholder, so no call could be made")

        # Flush usage; the usage page shows the call.
        if gateway_live and "flush_usage" in get_commands():
            page.get_by_role("link", name="Usage", exact=True).click()
            requests_24h = page.get_by_test_id("requests-24h")
            deadline = time.monotonic() + 20
            # The gateway hands usage events to Redis within ~0.2 s; the flusher turns them into records.
            while requests_24h.inner_text() != "1" and time.monotonic() < deadline:
                subprocess.run(
                    [sys.executable, "manage.py", "flush_usage"],
                    cwd=ROOT,
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                page.reload()
            expect(requests_24h).to_have_text("1")
            expect(page.locator("svg.chart").first).to_be_visible()
            shot("usage")
        elif gateway_live:
            skipped.append("manage.py flush_usage does not exist yet, so the usage page could not show the call")

        # Revoke; the gateway refuses the key.
        page.goto(page.url.split("/usage/")[0] + "/")
        page.get_by_role("link", name="Revoke").click()
        shot("revoke-confirm")
        page.get_by_role("button", name="Revoke the key").click()
        expect(page.get_by_text("revoked. It stops working")).to_be_visible()
        shot("revoked")
        if gateway_live:
            deadline = time.monotonic() + 2
            status = _call(base, key).status_code
            while status == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
                status = _call(base, key).status_code
            assert status == 401

        # The same page on a phone-sized screen.
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        shot("app-on-a-phone")
    if skipped:
        pytest.skip("; ".join(skipped))
