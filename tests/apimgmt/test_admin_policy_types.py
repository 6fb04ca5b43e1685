"""The admin's forms for the policy-chain types: readable fields with help and an example, errors next to the field
they are about, the JSON config kept for advanced use. Posted like a browser does (CSRF checked)."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from apimgmt import services
from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, ConsumerIdentity, JwtIssuer, Plan, Policy, Tenant

pytestmark = pytest.mark.django_db

ADD = "admin:apimgmt_policy_add"
BASE = {"tenant": "acme", "description": "", "mode": "enforce", "on_store_error": "open", "config": ""}


class FormValues(HTMLParser):
    """What a browser would post for the page's main form as it stands (inputs, checkboxes, selects, textareas)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[str]] = {}
        self._select: tuple[str, bool] | None = None
        self._textarea: str | None = None
        self._text = ""

    def _add(self, name: str, value: str) -> None:
        self.values.setdefault(name, []).append(value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        name = a.get("name", "")
        if tag == "input" and name and a.get("type", "text") not in ("submit", "button", "file"):
            if a.get("type") in ("checkbox", "radio"):
                if "checked" in a:
                    self._add(name, a.get("value") or "on")
            else:
                self._add(name, a.get("value", ""))
        elif tag == "select" and name:
            self._select = (name, "multiple" in a)
            self.values.setdefault(name, [])
        elif tag == "option" and self._select and "selected" in a:
            self._add(self._select[0], a.get("value", ""))
        elif tag == "textarea" and name:
            self._textarea, self._text = name, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea:
            self._add(self._textarea, self._text[1:] if self._text.startswith("\n") else self._text)
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self._text += data


class Browser:
    """A signed-in admin session with CSRF checks on: every form is fetched before it is posted."""

    def __init__(self, user: User) -> None:
        self.client = Client(enforce_csrf_checks=True)
        self.client.force_login(user)

    def get(self, url: str) -> str:
        response = self.client.get(url)
        assert response.status_code == 200, response.status_code
        return response.content.decode()

    def submit(self, url: str, changes: dict[str, Any]) -> Any:
        """Post the form at ``url`` as it stands, with ``changes`` (a list for several values; None removes)."""
        parser = FormValues()
        parser.feed(self.get(url))
        data: dict[str, Any] = dict(parser.values)
        for name, value in changes.items():
            if value is None:
                data.pop(name, None)
            else:
                data[name] = value
        return self.client.post(url, data)

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
    # Lists are textareas, one item per line; booleans are checkboxes.
    assert re.search(r'<textarea name="cors_allow_origins"', page)
    assert re.search(r'<input type="checkbox" name="cors_allow_credentials"', page)
    assert re.search(r'<input type="checkbox" name="cache_count_hits_toward_quota"[^>]*checked', page)
    assert "apimgmt/policy_form.js" in page  # shows only the chosen type's fields
    assert "data-reload-with" not in page, "choosing the tenant keeps what was typed: no picker depends on it"


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
    listing = browser.get(reverse("admin:apimgmt_policy_changelist"))
    assert "origins: https://app.example.com, https://*.example.com" in listing


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


# ---------------------------------------------------------------------------
# JWT issuers, APIs' authentication, consumers' identities and IP lists
# ---------------------------------------------------------------------------

JWKS_URL = "https://id.example.com/.well-known/jwks.json"


def _select_options(page: str, name: str) -> list[str]:
    select = re.search(rf'<select name="{name}"[^>]*>(.*?)</select>', page, re.S)
    assert select, f"no select {name}"
    return [
        html.unescape(label)
        for value, label in re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select.group(1))
        if value
    ]


def _issuer(tenant: Tenant, name: str, **options: Any) -> JwtIssuer:
    options.setdefault("audiences", ["users-api"])
    return services.jwt_issuer_create(
        tenant=tenant, name=name, issuer=f"https://{name}.example.com/", jwks_url=JWKS_URL, actor=None, **options
    )


def test_a_jwt_issuer_is_made_in_the_admin_through_the_service(browser: Browser) -> None:
    page = html.unescape(browser.get(reverse("admin:apimgmt_jwtissuer_add")))
    assert "For example https://api.example.com." in field_row(page, "audiences")
    assert re.search(r'<input type="checkbox" name="algorithms" value="RS256"[^>]*checked', page)
    assert 'value="HS256"' not in page and 'value="none"' not in page
    assert "data-reload-with" not in page
    response = browser.post(
        reverse("admin:apimgmt_jwtissuer_add"),
        {
            "tenant": "acme",
            "name": "corporate",
            "issuer": "https://id.example.com/",
            "audiences": "users-api\r\nhttps://api.example.com\r\n",
            "jwks_url": JWKS_URL,
            "public_keys": "",
            "algorithms": ["RS256", "ES256"],
            "leeway_seconds": "30",
            "consumer_claim": "azp",
            "token_in_query": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    issuer = JwtIssuer.objects.get(name="corporate")
    assert issuer.tenant_id == "acme" and issuer.audiences == ["users-api", "https://api.example.com"]
    assert issuer.algorithms == ["RS256", "ES256"] and issuer.consumer_claim == "azp"
    assert AuditEvent.objects.filter(action="jwt_issuer.create", object_id=issuer.pk).exists()

    url = reverse("admin:apimgmt_jwtissuer_change", args=[issuer.pk])
    assert re.search(
        r'<textarea name="audiences"[^>]*>\s*users-api\nhttps://api.example.com</textarea>', browser.get(url)
    )
    response = browser.submit(url, {"leeway_seconds": "60"})
    assert response.status_code == 302, response.content.decode()[-3000:]
    issuer.refresh_from_db()
    assert issuer.leeway_seconds == 60
    assert AuditEvent.objects.filter(action="jwt_issuer.update", object_id=issuer.pk).exists()


@pytest.mark.parametrize(
    ("changes", "row", "message"),
    [
        ({"jwks_url": ""}, "jwks_url", "Set jwks_url (where the issuer publishes its keys) or public_keys"),
        ({"jwks_url": "http://169.254.169.254/keys"}, "jwks_url", "jwks_url host '169.254.169.254' is a loopback"),
        ({"issuer": "id.example.com"}, "issuer", "issuer must be an http(s) URL"),
        ({"leeway_seconds": "900"}, "leeway_seconds", "300"),
        ({"public_keys": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "public_keys", "symmetric key"),
        ({"algorithms": ["HS256"]}, "algorithms", "Select a valid choice. HS256 is not one of the available choices."),
    ],
)
def test_a_jwt_issuer_error_is_shown_next_to_its_field(
    browser: Browser, settings: Any, changes: dict[str, Any], row: str, message: str
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = False
    data = {
        "tenant": "acme",
        "name": "corporate",
        "issuer": "https://id.example.com/",
        "audiences": "users-api",
        "jwks_url": JWKS_URL,
        "public_keys": "",
        "algorithms": ["RS256"],
        "leeway_seconds": "30",
        "consumer_claim": "sub",
        "token_in_query": "",
        **changes,
    }
    response = browser.post(reverse("admin:apimgmt_jwtissuer_add"), data)
    assert response.status_code == 200
    assert message in row_errors(response.content.decode(), row), row_errors(response.content.decode(), row)
    assert not JwtIssuer.objects.exists()


def test_jwt_issuers_are_scoped_to_the_tenants_a_staff_member_administers(
    client: Client, acme: Tenant, globex: Tenant
) -> None:
    mine, theirs = _issuer(acme, "corporate"), _issuer(globex, "partners")
    sam = User.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(Permission.objects.filter(content_type__app_label="apimgmt"))
    services.membership_set(tenant=acme, user=sam, role="admin", actor=None)
    client.force_login(sam)
    listing = client.get(reverse("admin:apimgmt_jwtissuer_changelist")).content.decode()
    assert "corporate" in listing and "partners" not in listing
    assert client.get(reverse("admin:apimgmt_jwtissuer_change", args=[mine.pk])).status_code == 200
    assert client.get(reverse("admin:apimgmt_jwtissuer_change", args=[theirs.pk])).status_code == 404
    assert client.get(reverse("admin:apimgmt_jwtissuer_delete", args=[theirs.pk])).status_code == 404


def test_an_issuer_an_api_accepts_cannot_be_deleted(browser: Browser, acme: Tenant, acme_api: Api) -> None:
    issuer = _issuer(acme, "corporate")
    services.api_update(api=acme_api, auth_method="jwt", jwt_issuers=[issuer], actor=None)
    assert browser.client.get(reverse("admin:apimgmt_jwtissuer_delete", args=[issuer.pk])).status_code == 403
    services.api_update(api=acme_api, auth_method="key", jwt_issuers=[], actor=None)
    response = browser.post(reverse("admin:apimgmt_jwtissuer_delete", args=[issuer.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not JwtIssuer.objects.exists()
    assert AuditEvent.objects.filter(action="jwt_issuer.delete").exists()


def test_an_apis_issuer_picker_offers_only_its_tenants_issuers(
    browser: Browser, acme: Tenant, globex: Tenant, acme_api: Api
) -> None:
    _issuer(acme, "corporate")
    _issuer(globex, "partners")
    page = browser.get(reverse("admin:apimgmt_api_change", args=[acme_api.pk]))
    assert _select_options(page, "jwt_issuers") == ["corporate (https://corporate.example.com/)"]
    assert _select_options(page, "auth_method") == ["API key", "JWT (a token from a listed issuer)", "API key or JWT"]
    page = browser.get(reverse("admin:apimgmt_api_add"))
    assert _select_options(page, "jwt_issuers") == ["corporate (acme)", "partners (globex)"]
    page = browser.get(reverse("admin:apimgmt_api_add") + "?tenant=globex")
    assert _select_options(page, "jwt_issuers") == ["partners (https://partners.example.com/)"]


def test_an_api_switched_to_jwt_in_the_admin_needs_an_issuer(browser: Browser, acme: Tenant, acme_api: Api) -> None:
    corporate = _issuer(acme, "corporate")
    url = reverse("admin:apimgmt_api_change", args=[acme_api.pk])
    response = browser.submit(url, {"auth_method": "jwt"})
    assert response.status_code == 200
    assert "Choose at least one JWT issuer" in row_errors(response.content.decode(), "jwt_issuers")
    acme_api.refresh_from_db()
    assert acme_api.auth_method == "key"

    response = browser.submit(url, {"auth_method": "key_or_jwt", "jwt_issuers": [corporate.pk]})
    assert response.status_code == 302, response.content.decode()[-3000:]
    acme_api.refresh_from_db()
    assert acme_api.auth_method == "key_or_jwt" and list(acme_api.jwt_issuers.all()) == [corporate]
    assert AuditEvent.objects.filter(action="api.update", object_id=acme_api.pk).exists()


def test_validation_needs_an_openapi_document(browser: Browser, acme_api: Api) -> None:
    url = reverse("admin:apimgmt_api_change", args=[acme_api.pk])
    response = browser.submit(url, {"validation": "enforce"})
    assert response.status_code == 200
    assert "needs an OpenAPI document with paths" in row_errors(response.content.decode(), "validation")


def test_a_plans_policy_picker_leaves_out_the_types_that_belong_to_an_api(browser: Browser, acme: Tenant) -> None:
    cors = services.policy_create(
        tenant=acme, name="web", policy_type="cors", config={"allow_origins": ["*"]}, actor=None
    )
    services.policy_create(
        tenant=acme, name="office", policy_type="ip_rules", config={"allow": ["10.0.0.0/8"]}, actor=None
    )
    page = browser.get(reverse("admin:apimgmt_plan_add") + "?tenant=acme")
    assert _select_options(page, "policies") == ["office (ip_rules)"]
    response = browser.post(
        reverse("admin:apimgmt_plan_add") + "?tenant=acme",
        {"tenant": "acme", "name": "gold", "description": "", "approval": "auto", "policies": [cors.pk]},
    )
    assert response.status_code == 200
    assert f"Select a valid choice. {cors.pk} is not one of the available choices." in row_errors(
        response.content.decode(), "policies"
    )
    assert not Plan.objects.exists()


def test_a_consumers_ip_lists_and_identities_are_edited_in_the_admin(
    browser: Browser, acme: Tenant, globex: Tenant, bob_app: Consumer
) -> None:
    corporate, foreign = _issuer(acme, "corporate"), _issuer(globex, "partners")
    url = reverse("admin:apimgmt_consumer_change", args=[bob_app.pk])
    page = browser.get(url)
    assert "For example 203.0.113.0/24." in html.unescape(field_row(page, "ip_allow"))
    assert _select_options(page, "identities-__prefix__-issuer") == ["corporate (https://corporate.example.com/)"]

    response = browser.submit(url, {"ip_allow": "10.0.0.1/8"})
    assert "has host bits set; the network is 10.0.0.0/8" in row_errors(response.content.decode(), "ip_allow")

    response = browser.submit(
        url,
        {
            "ip_allow": "203.0.113.0/24\r\n2001:db8::/32",
            "ip_deny": "203.0.113.7",
            "identities-TOTAL_FORMS": "1",
            "identities-0-issuer": corporate.pk,
            "identities-0-external_id": "user-42",
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    bob_app.refresh_from_db()
    assert bob_app.ip_allow == ["203.0.113.0/24", "2001:db8::/32"] and bob_app.ip_deny == ["203.0.113.7/32"]
    identity = ConsumerIdentity.objects.get()
    assert (identity.consumer_id, identity.issuer_id, identity.external_id) == (bob_app.pk, corporate.pk, "user-42")
    assert AuditEvent.objects.filter(action="consumer_identity.create", object_id=identity.pk).exists()
    assert AuditEvent.objects.filter(action="consumer.update", object_id=bob_app.pk).exists()

    # Another tenant's issuer, posted by hand: refused next to the picker.
    response = browser.submit(
        url,
        {"identities-TOTAL_FORMS": "2", "identities-1-issuer": foreign.pk, "identities-1-external_id": "user-42"},
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    # An external id another app already has at that issuer: refused next to it, nothing saved.
    other = services.consumer_create(tenant=acme, name="other-app", actor=None)
    services.consumer_identity_create(consumer=other, issuer=corporate, external_id="user-7", actor=None)
    response = browser.submit(
        url,
        {"identities-TOTAL_FORMS": "2", "identities-1-issuer": corporate.pk, "identities-1-external_id": "user-7"},
    )
    assert response.status_code == 200
    assert "Another consumer already has this external ID at this issuer." in html.unescape(response.content.decode())
    assert ConsumerIdentity.objects.filter(consumer=bob_app).count() == 1
    # Deleted through the service.
    response = browser.submit(url, {"identities-0-DELETE": "on"})
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert not ConsumerIdentity.objects.filter(consumer=bob_app).exists()
    assert AuditEvent.objects.filter(action="consumer_identity.delete").exists()


def test_a_keys_ip_lists_are_set_when_it_is_made_and_changed_later(browser: Browser, bob_app: Consumer) -> None:
    response = browser.post(
        reverse("admin:apimgmt_apikey_add"),
        {
            "consumer": bob_app.pk,
            "name": "ci",
            "expires_at_0": "",
            "expires_at_1": "",
            "ip_allow": "198.51.100.0/24",
            "ip_deny": "",
        },
    )
    assert response.status_code == 200 and "New API key" in response.content.decode()
    key = ApiKey.objects.get(name="ci")
    assert key.ip_allow == ["198.51.100.0/24"] and key.ip_deny == []

    url = reverse("admin:apimgmt_apikey_change", args=[key.pk])
    assert re.search(r'<textarea name="ip_allow"[^>]*>\s*198.51.100.0/24</textarea>', browser.get(url))
    response = browser.submit(url, {"ip_deny": "198.51.100.9"})
    assert response.status_code == 302, response.content.decode()[-3000:]
    key.refresh_from_db()
    assert key.ip_deny == ["198.51.100.9/32"] and key.ip_allow == ["198.51.100.0/24"]
    assert AuditEvent.objects.filter(action="api_key.update", object_id=key.pk).exists()

    services.api_key_revoke(key=key, actor=None)
    page = browser.get(url)
    assert '<textarea name="ip_deny"' not in page and "198.51.100.9/32" in page  # history: shown, not editable


def test_a_jwt_api_is_published_in_the_admin_with_its_issuer(browser: Browser, acme: Tenant) -> None:
    corporate = _issuer(acme, "corporate")
    response = browser.submit(
        reverse("admin:apimgmt_api_add") + "?tenant=acme",
        {
            "tenant": "acme",
            "api_name": "orders",
            "base_path": "/orders",
            "upstream_url": "https://orders.example.com",
            "auth_method": "jwt",
            "jwt_issuers": [corporate.pk],
            "targets-TOTAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, (
        row_errors(response.content.decode(), "jwt_issuers") or response.content.decode()[-3000:]
    )
    api = Api.objects.get(api_name="orders")
    assert api.auth_method == "jwt" and list(api.jwt_issuers.all()) == [corporate]
    created = AuditEvent.objects.get(action="api.create", object_id=api.pk)
    assert created.changes["jwt_issuers"] == [corporate.pk]


@pytest.mark.parametrize(
    ("policy_type", "stored", "edited"),
    [
        ("rate_limiting", {"requests_per_minute": 100}, {"requests_per_minute": 60, "burst_size": 10}),
        ("quota", {"requests_per_month": 10_000}, {"requests_per_day": 500, "key_extraction": "key_id"}),
    ],
)
def test_a_limit_edited_only_in_the_json_box_is_saved(
    browser: Browser, acme: Tenant, policy_type: str, stored: dict[str, Any], edited: dict[str, Any]
) -> None:
    """The change form fills the typed fields from the stored config; posting them back unchanged is not an edit."""
    policy = services.policy_create(tenant=acme, name="limit", policy_type=policy_type, config=stored, actor=None)
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    response = browser.submit(url, {"config": json.dumps(edited)})
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert {key: policy.config[key] for key in edited} == edited
    assert not {"requests_per_minute", "requests_per_month"} & (set(policy.config) - set(edited)), policy.config


def test_a_limit_edited_only_in_its_fields_is_saved(browser: Browser, acme: Tenant) -> None:
    policy = services.policy_create(
        tenant=acme, name="limit", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=None
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    response = browser.submit(url, {"rate_requests_per_minute": "60", "rate_requests_per_hour": "2000"})
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert (policy.config["requests_per_minute"], policy.config["requests_per_hour"]) == (60, 2000)


def test_fields_and_json_box_changed_differently_is_an_error_naming_both(browser: Browser, acme: Tenant) -> None:
    policy = services.policy_create(
        tenant=acme, name="limit", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=None
    )
    url = reverse("admin:apimgmt_policy_change", args=[policy.pk])
    stored = dict(policy.config)

    response = browser.submit(url, {"rate_requests_per_minute": "60", "config": '{"requests_per_minute": 70}'})

    assert response.status_code == 200
    page = html.unescape(response.content.decode())
    assert (
        "Both the typed fields (Requests per minute) and the JSON config were changed, and they disagree: "
        "requests_per_minute is 60 in the fields, 70 in the JSON." in page
    )
    policy.refresh_from_db()
    assert policy.config == stored
    # The same change made on both sides is no disagreement.
    response = browser.submit(url, {"rate_requests_per_minute": "70", "config": '{"requests_per_minute": 70}'})
    assert response.status_code == 302, response.content.decode()[-3000:]
    policy.refresh_from_db()
    assert policy.config["requests_per_minute"] == 70
