"""The new-key page in headless Chromium at 1280 and 390 px: the whole key is visible (it wraps, nothing cut
off), the curl line has its own Copy button that copies that line, and a rotated key says which key it
replaces. Screenshots are kept under test-output/screenshots/portal-key-page/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User

import apimgmt.echo
from apimgmt import services
from apimgmt.models import Api, Consumer
from tests.support.browser import app_and_browser, publish_echo_api, require_chromium, screenshot_dir
from tests.support.servers import wsgi_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

PASSWORD = "keys-pass-phrase-2024"

# A text box shows all of its text when nothing is scrolled out of sight in either direction.
_SHOWS_ALL = "el => el.scrollWidth <= el.clientWidth + 1 && el.scrollHeight <= el.clientHeight + 1"


@pytest.fixture
def subscribed_app(transactional_db: Any, settings: Any) -> Iterator[tuple[Api, Consumer]]:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    with wsgi_server(apimgmt.echo.app) as echo_url:
        tenant = services.tenant_create(id="demo", name="Demo Co", actor=None)
        api = publish_echo_api(tenant, echo_url)
        grace = User.objects.create_user("grace", "grace@example.com", PASSWORD)
        services.membership_set(tenant=tenant, user=grace, role="developer", actor=None)
        app = services.consumer_create(tenant=tenant, name="weather", owner=grace, actor=grace)
        services.subscription_request(consumer=app, api=api, actor=grace)
        yield api, app


def test_the_new_key_page_at_1280_and_390_px(
    subscribed_app: tuple[Api, Consumer], live_env: dict[str, str], tmp_path: Path
) -> None:
    _api, app = subscribed_app
    shots = screenshot_dir("portal-key-page")
    expect = playwright_sync.expect
    env = {**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    with app_and_browser(env, tmp_path / "gunicorn.log") as (base, browser):
        for width, height in ((1280, 900), (390, 844)):
            context = browser.new_context(
                viewport={"width": width, "height": height}, permissions=["clipboard-read", "clipboard-write"]
            )
            page = context.new_page()
            page.set_default_timeout(10000)
            page.goto(f"{base}/portal/demo/login/?next=/portal/demo/apps/{app.pk}/keys/new/")
            page.get_by_label("User name").fill("grace")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_label("Key name").fill(f"laptop-{width}")
            page.get_by_role("button", name="Create key").click()

            key_box = page.get_by_test_id("new-key")
            key = key_box.input_value()
            assert re.fullmatch(r"ak_live_\w{38}", key)
            assert key_box.evaluate(_SHOWS_ALL), "the key is cut off"
            curl_box = page.get_by_test_id("curl-line")
            curl = curl_box.input_value()
            assert curl == f'curl -H "X-API-Key: {key}" {base}/echo/'
            assert curl_box.evaluate(_SHOWS_ALL), "the curl line is cut off"
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            page.get_by_role("button", name="Copy the curl line for Echo").click()
            expect(page.get_by_text("Copied to the clipboard.")).to_be_visible()
            assert page.evaluate("navigator.clipboard.readText()") == curl
            page.get_by_role("button", name="Copy", exact=True).click()
            assert page.evaluate("navigator.clipboard.readText()") == key
            page.screenshot(path=str(shots / f"new-key-{width}.png"), full_page=True)
            # The copied line works as it is.
            command = re.fullmatch(r'curl -H "([^:]+): (\S+)" (\S+)', curl)
            assert command
            reply = requests.get(command.group(3) + "hello", headers={command.group(1): command.group(2)}, timeout=10)
            assert reply.status_code == 200, reply.text

            # Rotate: the new key says which one it replaces, here and on the app's page.
            page.goto(f"{base}/portal/demo/apps/{app.pk}/")
            page.get_by_role("row", name=re.compile(f"laptop-{width}")).get_by_role("link", name="Rotate").click()
            page.get_by_role("button", name=re.compile("Rotate")).click()
            expect(page.get_by_test_id("replaces")).to_have_text(f"replaces {key[:12]}…")
            page.screenshot(path=str(shots / f"rotated-key-{width}.png"), full_page=True)
            context.close()
