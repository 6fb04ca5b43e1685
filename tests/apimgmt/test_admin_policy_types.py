"""The admin's forms for the policy-chain types: readable fields with help and an example, errors next to the field
they are about, the JSON config kept for advanced use. Posted like a browser does (CSRF checked)."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.models import AuditEvent, Policy, Tenant

pytestmark = pytest.mark.django_db

ADD = "admin:apimgmt_policy_add"
BASE = {"tenant": "acme", "description": "", "mode": "enforce", "on_store_error": "open", "config": ""}


class Browser:
    """A signed-in admin session with CSRF checks on: every form is fetched before it is posted."""

    def __init__(self, user: User) -> None:
        self.client = Client(enforce_csrf_checks=True)
        self.client.force_login(user)

    def get(self, url: str) -> str:
        response = self.client.get(url)
        assert response.status_code == 200, response.status_code
        return response.content.decode()

    def post(self, url: str, data: dict[str, Any]) -> Any:
        page = self.get(url)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token, "the form has no CSRF token"
        return self.client.post(url, {**data, "csrfmiddlewaretoken": token.group(1)})


@pytest.fixture
def browser(staff: User, acme: Tenant) -> Browser:
    return Browser(staff)


def field_row(page: str, name: str) -> str:
    """The admin's form row of one field (its errors, input and help), as HTML."""
    match = re.search(rf'<div class="form-row[^"]*\bfield-{name}\b.*?(?=<div class="form-row|</fieldset>)', page, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


def row_errors(page: str, name: str) -> str:
    return " ".join(
        html.unescape(e) for e in re.findall(r'<ul class="errorlist[^>]*>(.*?)</ul>', field_row(page, name), re.S)
    )


def test_the_add_form_explains_each_type_with_help_and_an_example(browser: Browser) -> None:
    page = html.unescape(browser.get(reverse(ADD)))
    for heading in (
        "CORS (policy type cors)",
        "IP rules (policy type ip_rules)",
        "Header transforms (policy type headers)",
        "Request limits (policy type request_limits)",
        "Response cache (policy type response_cache)",
    ):
        assert heading in page
    assert "For example https://app.example.com" in field_row(page, "cors_allow_origins")
    assert "For example 203.0.113.0/24." in field_row(page, "ip_allow")
    assert "For example X-Consumer: {consumer_id}." in field_row(page, "headers_request_add")
    assert "For example 1048576 (1 MiB)." in field_row(page, "limits_max_body_bytes")
    assert "For example Accept-Language." in field_row(page, "cache_vary_headers")
    # Lists are textareas, one item a line; booleans are checkboxes.
    assert re.search(r'<textarea name="cors_allow_origins"', page)
    assert re.search(r'<input type="checkbox" name="cors_allow_credentials"', page)
    assert re.search(r'<input type="checkbox" name="cache_count_hits_toward_quota"[^>]*checked', page)
    assert "apimgmt/policy_form.js" in page  # shows only the chosen type's fields


def test_cors_is_made_from_its_fields(browser: Browser) -> None:
    response = browser.post(
        reverse(ADD),
        {
            **BASE,
            "name": "web",
            "policy_type": "cors",
            "cors_allow_origins": "https://app.example.com\r\n\r\n  https://*.example.com  \r\n",
            "cors_allow_methods": "GET\r\npost",
            "cors_expose_headers": "X-Request-ID",
            "cors_allow_credentials": "on",
            "cors_max_age": "3600",
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert Policy.objects.get(name="web").config == {
        "allow_origins": ["https://app.example.com", "https://*.example.com"],
        "allow_methods": ["GET", "POST"],
        "allow_headers": [],
        "expose_headers": ["X-Request-ID"],
        "allow_credentials": True,
        "max_age": 3600,
    }
    assert AuditEvent.objects.filter(action="policy.create", object_id=Policy.objects.get(name="web").pk).exists()


def test_ip_rules_headers_limits_and_cache_are_made_from_their_fields(browser: Browser) -> None:
    made: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
        "office": (
            {"policy_type": "ip_rules", "ip_allow": "203.0.113.0/24\r\n2001:db8::/32", "ip_deny": "203.0.113.7"},
            {"allow": ["203.0.113.0/24", "2001:db8::/32"], "deny": ["203.0.113.7/32"]},
        ),
        "stamp": (
            {
                "policy_type": "headers",
                "headers_request_add": "X-Consumer: {consumer_id}\r\nX-Team: payments",
                "headers_request_remove": "X-Debug",
                "headers_response_set": "Cache-Control: no-store",
            },
            {
                "request": {
                    "add": {"X-Consumer": "{consumer_id}", "X-Team": "payments"},
                    "set": {},
                    "remove": ["X-Debug"],
                },
                "response": {"add": {}, "set": {"Cache-Control": "no-store"}, "remove": []},
            },
        ),
        "small": (
            {"policy_type": "request_limits", "limits_allowed_methods": "GET\r\nPOST", "limits_max_body_bytes": "1024"},
            {"allowed_methods": ["GET", "POST"], "max_body_bytes": 1024},
        ),
        "cached": (
            # The browser leaves "Hits count toward quota" unchecked: it is not posted.
            {"policy_type": "response_cache", "cache_ttl_seconds": "60", "cache_per_consumer": "on"},
            {"ttl_seconds": 60, "per_consumer": True, "count_hits_toward_quota": False},
        ),
    }
    for name, (fields, expected) in made.items():
        response = browser.post(reverse(ADD), {**BASE, "name": name, **fields})
        assert response.status_code == 302, (name, response.content.decode()[-3000:])
        config = Policy.objects.get(name=name).config
        assert {k: v for k, v in config.items() if k in expected} == expected, (name, config)


@pytest.mark.parametrize(
    ("fields", "row", "message"),
    [
        (
            {"policy_type": "cors", "cors_allow_origins": "https://app.example.com/"},
            "cors_allow_origins",
            "allow_origins[0]: 'https://app.example.com/' has more than scheme, host and port",
        ),
        (
            {"policy_type": "cors", "cors_allow_origins": "*", "cors_allow_credentials": "on"},
            "cors_allow_credentials",
            "allow_credentials cannot be true with allow_origins ['*']",
        ),
        (
            {"policy_type": "cors", "cors_allow_origins": "https://a.example.com", "cors_max_age": "90000"},
            "cors_max_age",
            "max_age must be",
        ),
        ({"policy_type": "ip_rules", "ip_deny": "10.0.0.1/8"}, "ip_deny", "deny[0]: '10.0.0.1/8' has host bits set"),
        (
            {"policy_type": "headers", "headers_request_set": "Host: evil.example"},
            "headers_request_set",
            "request.set: 'Host'",
        ),
        (
            {"policy_type": "headers", "headers_response_add": "X-Who: {password}"},
            "headers_response_add",
            "uses the unknown template {password}",
        ),
        (
            {"policy_type": "headers", "headers_request_add": "X-Team payments"},
            "headers_request_add",
            "Line 1 is not 'Name: value'",
        ),
        (
            {"policy_type": "request_limits", "limits_allowed_methods": "GET\r\nget it"},
            "limits_allowed_methods",
            "allowed_methods[1]",
        ),
        ({"policy_type": "response_cache", "cache_ttl_seconds": "0"}, "cache_ttl_seconds", "ttl_seconds must be"),
        (
            {
                "policy_type": "rate_limiting",
                "rate_requests_per_minute": "5",
                "rate_window_type": "fixed",
                "rate_burst_size": "3",
            },
            "rate_burst_size",
            "burst_size only applies",
        ),
    ],
)
def test_an_error_is_shown_next_to_the_field_it_is_about(
    browser: Browser, fields: dict[str, str], row: str, message: str
) -> None:
    response = browser.post(reverse(ADD), {**BASE, "name": "bad", **fields})
    assert response.status_code == 200
    page = response.content.decode()
    assert message in row_errors(page, row), row_errors(page, row) or html.unescape(page)[-4000:]
    assert not Policy.objects.exists()


def test_an_error_about_no_field_in_particular_is_shown_above_the_form(browser: Browser) -> None:
    response = browser.post(reverse(ADD), {**BASE, "name": "empty", "policy_type": "ip_rules"})
    assert response.status_code == 200
    page = html.unescape(response.content.decode())
    assert re.search(
        r'<ul class="errorlist nonfield">.*ip_rules config needs at least one CIDR in allow or deny', page, re.S
    )
    assert not Policy.objects.exists()


def test_the_change_form_shows_only_its_type_with_the_stored_config_and_saves_an_edit(
    browser: Browser, acme: Tenant
) -> None:
    policy = services.policy_create(
        tenant=acme,
        name="web",
        policy_type="headers",
        config={"request": {"set": {"X-Team": "payments"}, "remove": ["X-Debug"]}},
        actor=None,
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    page = browser.get(url)
    assert "Header transforms (policy type headers)" in page and "CORS (policy type cors)" not in page
    assert re.search(r'<textarea name="headers_request_set"[^>]*>\s*X-Team: payments</textarea>', page)
    assert re.search(r'<textarea name="headers_request_remove"[^>]*>\s*X-Debug</textarea>', page)
    response = browser.post(
        url,
        {
            **BASE,
            "name": "web",
            "config": html.unescape(re.search(r'<textarea name="config"[^>]*>(.*?)</textarea>', page, re.S).group(1)),  # type: ignore[union-attr]
            "headers_request_set": "X-Team: payments\r\nX-Region: eu",
            "headers_request_remove": "X-Debug",
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert policy.config["request"]["set"] == {"X-Team": "payments", "X-Region": "eu"}
    assert AuditEvent.objects.filter(action="policy.update", object_id=policy.pk).exists()


def test_the_json_config_is_kept_for_advanced_use(browser: Browser, acme: Tenant) -> None:
    response = browser.post(
        reverse(ADD),
        {
            **BASE,
            "name": "cache-json",
            "policy_type": "response_cache",
            "cache_count_hits_toward_quota": "on",  # as the browser posts the untouched checkbox
            "config": '{"ttl_seconds": 30, "vary_headers": ["Accept-Language"]}',
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    config = Policy.objects.get(name="cache-json").config
    assert config["ttl_seconds"] == 30 and [h.lower() for h in config["vary_headers"]] == ["accept-language"]

    policy = services.policy_create(
        tenant=acme, name="office", policy_type="ip_rules", config={"allow": ["10.0.0.0/8"]}, actor=None
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    response = browser.post(
        url, {**BASE, "name": "office", "ip_allow": "10.0.0.0/8", "config": '{"deny": ["192.0.2.0/24"]}'}
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert policy.config == {"allow": [], "deny": ["192.0.2.0/24"]}, "the JSON box wins when no field was changed"


def test_an_unknown_json_field_is_named_with_the_one_meant(browser: Browser) -> None:
    response = browser.post(
        reverse(ADD),
        {**BASE, "name": "typo", "policy_type": "cors", "config": '{"allow_origin": ["https://app.example.com"]}'},
    )
    assert response.status_code == 200
    assert "allow_origin (did you mean `allow_origins`?)" in row_errors(response.content.decode(), "config")
    assert not Policy.objects.exists()
