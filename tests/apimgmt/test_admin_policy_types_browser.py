"""The admin's policy add form in headless Chromium: choosing a policy type shows only that type's fields
(apimgmt/policy_form.js), and a CORS policy is made from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.models import Policy
from tests.support.browser import app_and_browser, require_chromium, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

PASSWORD = "root-pass-phrase-2024"


@pytest.fixture
def root(transactional_db: Any, settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    services.tenant_create(id="acme", name="Acme", actor=None)


def test_choosing_a_policy_type_shows_its_fields_and_saves_them(
    root: None, live_env: dict[str, str], tmp_path: Path
) -> None:
    shots = screenshot_dir("admin-policy-types")
    expect = playwright_sync.expect
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(10000)
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(f"{base}/admin/login/?next=/admin/apimgmt/policy/add/%3Ftenant%3Dacme")
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()

        rate = page.locator("fieldset.policy-type-rate_limiting")
        cors = page.locator("fieldset.policy-type-cors")
        expect(rate).to_be_visible()  # nothing chosen yet: every type's fields show
        page.locator("#id_policy_type").select_option("cors")
        expect(cors).to_be_visible()
        expect(rate).to_be_hidden()
        expect(page.locator("fieldset.policy-type-response_cache")).to_be_hidden()
        expect(page.get_by_text("Config as JSON")).to_be_visible()

        page.locator("#id_name").fill("web")
        page.locator("#id_cors_allow_origins").fill("https://app.example.com\nhttps://*.example.com")
        page.get_by_label("Allow credentials").check()
        page.get_by_label("Preflight cache (seconds)").fill("3600")
        page.screenshot(path=str(shots / "policy-add-cors.png"), full_page=True)
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.locator("ul.messagelist")).to_contain_text("was added successfully")
        page.screenshot(path=str(shots / "policy-added.png"), full_page=True)
        assert not [e for e in errors if "Content Security Policy" in e], errors

    config = Policy.objects.get(name="web").config
    assert config["allow_origins"] == ["https://app.example.com", "https://*.example.com"]
    assert config["allow_credentials"] is True and config["max_age"] == 3600
