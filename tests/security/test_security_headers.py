"""Browser-facing headers: a strict Content-Security-Policy and friends on every control-plane response, scoped
exceptions for the API docs, none of it on the gateway's answers; __Host- cookies over HTTPS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from apimgmt.models import Api, Consumer, Tenant
from apimgmt.settings import _csp_sources
from gateway.wsgi import reset_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Answer, Recorder, recording_upstream
from tests.support.settings_probe import run_python

pytestmark = pytest.mark.django_db  # every request passes the gateway's route table first

ROOT = Path(__file__).resolve().parents[2]

STRICT = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
BROWSER_HEADERS = ("Content-Security-Policy", "Content-Security-Policy-Report-Only", "Permissions-Policy")


def _directives(policy: str) -> dict[str, list[str]]:
    return {name: sources for name, *sources in (part.split() for part in policy.split("; "))}


@pytest.mark.parametrize(
    "path",
    [
        "/portal/acme/",
        "/portal/acme/login/",
        "/admin/login/",
        "/mgmt/v1/apis/",  # 401 problem+json
        "/mgmt/schema/",
        "/health",
        "/no-such-page",
    ],
)
def test_every_control_plane_response_has_the_strict_policy(client: Client, acme: Tenant, path: str) -> None:
    response = client.get(path)
    assert response["Content-Security-Policy"] == STRICT
    assert response["Permissions-Policy"] == "camera=(), geolocation=(), microphone=(), payment=(), usb=()"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"


def test_portal_pages_of_a_signed_in_developer_have_the_strict_policy(
    acme_api: Api, bob: User, bob_app: Consumer
) -> None:
    client = Client()
    client.force_login(bob)
    for path in (f"/portal/acme/apis/{acme_api.pk}/", f"/portal/acme/apps/{bob_app.pk}/usage/"):
        response = client.get(path)
        assert response.status_code == 200
        assert response["Content-Security-Policy"] == STRICT
        assert response["Cross-Origin-Opener-Policy"] == "same-origin"


def test_swagger_ui_runs_no_inline_script_and_alone_may_style_inline(client: Client) -> None:
    response = client.get("/mgmt/docs/")
    assert response.status_code == 200
    policy = _directives(response["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    assert b"<script>" not in response.content  # its start-up script comes from docs/?script=
    script = client.get("/mgmt/docs/?script=")
    assert script.status_code == 200 and script["Content-Type"].startswith("application/javascript")
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]


def test_redoc_alone_may_style_inline_and_start_a_blob_worker(client: Client) -> None:
    response = client.get("/mgmt/redoc/")
    assert response.status_code == 200
    policy = _directives(response["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    assert policy["worker-src"] == ["'self'", "blob:"]
    assert policy["img-src"] == ["'self'", "data:"]  # Redocly's logo stays blocked


def test_operators_add_sources_and_a_report_uri_from_settings(settings: Any) -> None:
    settings.CSP_EXTRA = _csp_sources("img-src https://cdn.example.com; object-src https://plugins.example.com")
    settings.CSP_REPORT_URI = "https://csp.example.com/report"
    policy = _directives(Client().get("/portal/acme/login/")["Content-Security-Policy"])
    assert policy["img-src"] == ["'self'", "data:", "https://cdn.example.com"]
    assert policy["object-src"] == ["https://plugins.example.com"]  # replaces 'none'
    assert policy["report-uri"] == ["https://csp.example.com/report"]
    assert policy["script-src"] == ["'self'"]
    docs = _directives(Client().get("/mgmt/docs/")["Content-Security-Policy"])
    assert docs["img-src"] == ["'self'", "data:", "https://cdn.example.com"]
    assert docs["report-uri"] == ["https://csp.example.com/report"]


def test_report_only_mode_sends_the_policy_without_enforcing_it(settings: Any) -> None:
    settings.CSP_REPORT_ONLY = True
    response = Client().get("/admin/login/")
    assert response["Content-Security-Policy-Report-Only"] == STRICT
    assert "Content-Security-Policy" not in response


def test_csp_extra_is_read_in_policy_syntax_and_refused_when_malformed() -> None:
    assert _csp_sources("") == {}
    assert _csp_sources(" img-src https://a.example https://b.example ;connect-src wss://c.example; ") == {
        "img-src": ["https://a.example", "https://b.example"],
        "connect-src": ["wss://c.example"],
    }
    for bad in ("img-src", "img_src https://a.example", "img-src https://a.example,https://b.example"):
        with pytest.raises(ImproperlyConfigured, match="CSP_EXTRA"):
            _csp_sources(bad)


def test_debug_error_pages_keep_their_inline_style(client: Client, settings: Any) -> None:
    settings.DEBUG = True
    response = client.get("/no-such-page")
    assert response.status_code == 404 and "Content-Security-Policy" not in response


# ---------------------------------------------------------------------------
# The gateway's answers belong to the tenants' APIs: none of the control plane's browser headers.
# ---------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@pytest.fixture
def users_api(acme: Tenant, upstream: Recorder, bob_app: Consumer, settings: Any, tmp_path: Path) -> Api:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    api = publish(acme, upstream.url + "/svc")
    subscribe(bob_app, api)
    return api


@pytest.fixture
def gateway() -> Iterator[InProcessGateway]:
    gw = InProcessGateway()
    yield gw
    reset_gateway()


def test_gateway_refusals_and_proxied_responses_carry_no_browser_policy(
    gateway: InProcessGateway, users_api: Api, upstream: Recorder, bob_key: tuple[Any, str]
) -> None:
    refused = gateway.get("/api/users/v1/items")
    assert refused.status == 401 and refused.header("Content-Type") == "application/problem+json"
    proxied = gateway.get("/api/users/v1/items", headers={"X-API-Key": bob_key[1]})
    assert proxied.status == 200 and upstream.seen
    for response in (refused, proxied):
        assert [response.header(name) for name in BROWSER_HEADERS] == [None, None, None]
    # Next to them, Django's own pages through the same application do carry the policy.
    assert gateway.get("/portal/acme/login/").header("Content-Security-Policy") == STRICT


def test_an_upstreams_own_policy_reaches_the_client_untouched(
    gateway: InProcessGateway, users_api: Api, upstream: Recorder, bob_key: tuple[Any, str]
) -> None:
    upstream.respond = lambda seen: Answer(
        headers=[("Content-Type", "text/html"), ("Content-Security-Policy", "default-src https:")], body=b"<p>hi</p>"
    )
    response = gateway.get("/api/users/v1/page", headers={"X-API-Key": bob_key[1]})
    assert response.status == 200
    assert response.header_all("Content-Security-Policy") == ["default-src https:"]
    assert response.header("Permissions-Policy") is None


def test_gateway_middleware_inside_django_answers_without_the_policy(users_api: Api) -> None:
    # Django's test client runs the MIDDLEWARE stack itself (no WSGI wrapper): GatewayMiddleware answers first.
    reset_gateway()
    try:
        response = Client().get("/api/users/v1/items")
    finally:
        reset_gateway()
    assert response.status_code == 401
    assert all(name not in response for name in BROWSER_HEADERS)


# ---------------------------------------------------------------------------
# Cookie names: __Host- over HTTPS, plain over http.
# ---------------------------------------------------------------------------

PROD = {
    "DEBUG": "0",
    "SECRET_KEY": "s" * 60 + "-Very-Random-Secret-Key-0123456789",
    "KEY_HASH_PEPPER": "p" * 40,
    "ALLOWED_HOSTS": "apimgmt.example.com",
}


def _cookie_settings(env: dict[str, str]) -> dict[str, str]:
    names = ("SESSION_COOKIE_NAME", "CSRF_COOKIE_NAME", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")
    code = f"import json; from django.conf import settings as s; print(json.dumps({{n: getattr(s, n) for n in {names!r}}}))"
    result = run_python(code, env, drop=set(PROD))
    assert result.returncode == 0, result.stderr
    values: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return values


def test_production_cookies_carry_the_host_prefix() -> None:
    assert _cookie_settings(PROD) == {
        "SESSION_COOKIE_NAME": "__Host-sessionid",
        "CSRF_COOKIE_NAME": "__Host-csrftoken",
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
    }


def test_cookies_over_plain_http_keep_their_plain_names() -> None:
    development = _cookie_settings({"DEBUG": "1"})
    assert (development["SESSION_COOKIE_NAME"], development["CSRF_COOKIE_NAME"]) == ("sessionid", "csrftoken")
    insecure = _cookie_settings({**PROD, "SESSION_COOKIE_SECURE": "0", "CSRF_COOKIE_SECURE": "0"})
    assert (insecure["SESSION_COOKIE_NAME"], insecure["CSRF_COOKIE_NAME"]) == ("sessionid", "csrftoken")


def test_a_secure_csrf_cookie_is_set_as_the_prefix_demands(settings: Any) -> None:
    settings.CSRF_COOKIE_SECURE = True
    settings.CSRF_COOKIE_NAME = "__Host-csrftoken"
    response = Client().get("/admin/login/")
    cookie = response.cookies["__Host-csrftoken"]
    # Browsers take a __Host- cookie only with Secure, Path=/ and no Domain.
    assert cookie["secure"] is True and cookie["path"] == "/" and cookie["domain"] == ""
