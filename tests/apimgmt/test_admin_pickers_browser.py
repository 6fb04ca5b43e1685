"""The admin's pickers in headless Chromium: choosing the tenant on an add form (or the API on a new
subscription) reloads it so the policy and plan pickers offer only that tenant's rows (apimgmt/pickers.js)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from tests.support.browser import app_and_browser, require_chromium, screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

require_chromium()
playwright_sync = pytest.importorskip("playwright.sync_api")

PASSWORD = "root-pass-phrase-2024"


@pytest.fixture
def two_tenants(transactional_db: Any, settings: Any) -> dict[str, str]:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    ids = {}
    for tenant_id in ("acme", "globex"):
        tenant = services.tenant_create(id=tenant_id, name=tenant_id.title(), actor=None)
        policy = services.policy_create(
            tenant=tenant, name=f"{tenant_id}-limit", policy_type="quota", config={"requests_per_day": 9}, actor=None
        )
        ids[f"{tenant_id}_plan"] = services.plan_create(
            tenant=tenant, name=f"{tenant_id}-gold", policies=[policy], actor=None
        ).pk
    acme = services.tenant_create(id="initech", name="Initech", actor=None)
    starter = services.plan_create(tenant=acme, name="starter", actor=None)
    services.plan_create(tenant=acme, name="internal", actor=None)
    api = services.api_create(
        tenant=acme,
        api_name="reports",
        base_path="/reports",
        upstream_url="https://reports.example.com",
        status="active",
        plans=[starter],
        actor=None,
    )
    services.consumer_create(tenant=acme, name="tps", actor=None)
    ids["api"] = api.pk
    return ids


def test_choosing_a_tenant_or_an_api_narrows_the_pickers(
    two_tenants: dict[str, str], live_env: dict[str, str], tmp_path: Path
) -> None:
    shots = screenshot_dir("admin-pickers")
    expect = playwright_sync.expect
    with app_and_browser({**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}, tmp_path / "gunicorn.log") as (
        base,
        browser,
    ):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(10000)
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(f"{base}/admin/login/?next=/admin/apimgmt/api/add/")
        page.get_by_label("Username").fill("root")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        plans = page.locator("#id_plans_from option, #id_plans option")
        expect(plans.first).to_be_attached()
        assert "acme-gold (acme)" in plans.all_inner_texts()
        page.get_by_label("Tenant").select_option("globex")
        page.wait_for_url(re.compile(r"/api/add/\?(.+&)?tenant=globex"))
        expect(page.get_by_label("Tenant")).to_have_value("globex")
        assert sorted(page.locator("#id_plans_from option, #id_plans option").all_inner_texts()) == ["globex-gold"]
        page.screenshot(path=str(shots / "api-add-globex.png"), full_page=True)

        page.goto(f"{base}/admin/apimgmt/subscription/add/")
        page.get_by_label("Api").select_option(two_tenants["api"])
        page.wait_for_url(re.compile(rf"/subscription/add/\?(.+&)?api={two_tenants['api']}"))
        assert page.locator("#id_plan option").all_inner_texts()[1:] == ["starter"]
        assert page.locator("#id_consumer option").all_inner_texts()[1:] == ["tps"]
        expect(page.get_by_text("The plans reports offers; a subscription must choose one.")).to_be_visible()
        page.screenshot(path=str(shots / "subscription-add-api-chosen.png"), full_page=True)
        assert not [e for e in errors if "Content Security Policy" in e], errors
