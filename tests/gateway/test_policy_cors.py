"""cors: preflights answered by the gateway with no key, CORS headers on every answer to an allowed origin."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from apimgmt import services
from apimgmt.models import Api, Consumer, Policy, Tenant
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Answer, Recorder, recording_upstream
from tests.support.servers import gunicorn

pytestmark = pytest.mark.django_db

PATH = "/api/users/v1/x"
CORS_NAMES = {
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "access-control-max-age",
}


def _cors(tenant: Tenant, **config: Any) -> Policy:
    return services.policy_create(tenant=tenant, name="browser", policy_type="cors", config=config, actor=None)


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy) -> Api:
    api = publish(tenant, upstream.url, policies=list(policies))
    subscribe(consumer, api)
    return api


def _preflight(gateway: InProcessGateway, origin: str, method: str = "PUT", headers: str | None = None) -> Any:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return gateway.request("OPTIONS", PATH, headers=sent)


def _cors_headers(response: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in response.headers if name.lower() in CORS_NAMES}


def _vary(response: Any) -> set[str]:
    return {token.strip().lower() for value in response.header_all("Vary") for token in value.split(",")}


@pytest.fixture
def browser_api(acme: Tenant, upstream: Recorder, bob_app: Consumer) -> Api:
    policy = _cors(
        acme,
        allow_origins=["https://app.example.com", "https://*.example.org", "http://localhost:3000"],
        allow_methods=["GET", "POST", "PUT"],
        allow_headers=["X-Trace"],
        expose_headers=["X-Total-Count"],
        allow_credentials=True,
        max_age=900,
    )
    return _api(acme, upstream, bob_app, policy)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://APP.example.com", True),  # host names are case-insensitive
        ("https://a.example.org", True),  # one label under the pattern
        ("https://a.b.example.org", True),  # several labels
        ("http://localhost:3000", True),
        ("https://example.org", False),  # the pattern's domain itself is not a subdomain
        ("https://evil-example.org", False),
        ("https://example.org.evil.com", False),
        ("https://a.example.org.evil.com", False),
        ("https://aexample.org", False),
        ("http://a.example.org", False),  # another scheme
        ("https://a.example.org:8443", False),  # another port
        ("http://localhost:3001", False),
        ("https://app.example.com.evil.com", False),
        ("http://app.example.com", False),
        ("null", False),
        ("https://evil.com", False),
    ],
)
def test_preflight_origin_matrix(gateway, browser_api, upstream, origin, allowed):
    response = _preflight(gateway, origin)
    cors = _cors_headers(response)
    if allowed:
        assert response.status == 204
        assert cors["access-control-allow-origin"] == origin  # echoed, never "*" with credentials
        assert cors["access-control-allow-credentials"] == "true"
        assert cors["access-control-allow-methods"] == "GET, POST, PUT"
        assert cors["access-control-max-age"] == "900"
    else:
        # no CORS header at all: the browser blocks the call; the detail tells a developer why
        assert response.status == 403
        assert cors == {}
        assert response.json()["type"].endswith("cors-refused")
        assert "may not call this API" in response.json()["detail"]
    assert {"origin", "access-control-request-method", "access-control-request-headers"} <= _vary(response)
    assert upstream.seen == []  # a preflight never reaches the upstream


@pytest.mark.parametrize(
    ("method", "allowed"),
    [("GET", True), ("POST", True), ("PUT", True), ("DELETE", False), ("PATCH", False), ("PURGE", False)],
)
def test_preflight_method_matrix(gateway, browser_api, method, allowed):
    response = _preflight(gateway, "https://app.example.com", method)
    assert response.status == (204 if allowed else 403)
    if not allowed:
        assert _cors_headers(response) == {}
        assert "GET, POST, PUT" in response.json()["detail"]


def test_preflight_needs_no_key_and_echoes_the_allowed_request_headers(gateway, browser_api, upstream):
    # X-Trace is listed; Content-Type is safelisted; X-API-Key is how this API is called, so it is always allowed
    response = _preflight(gateway, "https://a.example.org", "POST", "x-trace, content-type, x-api-key")
    assert response.status == 204
    assert response.header("Access-Control-Allow-Headers") == "x-trace, content-type, x-api-key"
    refused = _preflight(gateway, "https://a.example.org", "POST", "x-trace, x-secret")
    assert refused.status == 403
    assert "x-secret" in refused.json()["detail"] and "x-trace" not in refused.json()["detail"]
    assert upstream.seen == []


def test_any_origin_without_credentials_answers_star(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _cors(acme, allow_origins=["*"], allow_headers=["*"]))
    response = _preflight(gateway, "https://anything.test", "DELETE", "x-whatever, authorization")
    assert response.status == 204
    assert response.header("Access-Control-Allow-Origin") == "*"
    assert response.header("Access-Control-Allow-Credentials") is None
    # "*" in Allow-Headers would not cover Authorization: the requested names are echoed instead
    assert response.header("Access-Control-Allow-Headers") == "x-whatever, authorization"
    actual = gateway.get(PATH, headers={"X-API-Key": key, "Origin": "https://anything.test"})
    assert actual.status == 200
    assert actual.header("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize("credentials", [True, False])
def test_actual_request_from_an_allowed_origin_gets_the_headers(gateway, acme, upstream, bob_app, key, credentials):
    policy = _cors(
        acme,
        allow_origins=["https://app.example.com"],
        expose_headers=["X-Total-Count", "ETag"],
        allow_credentials=credentials,
    )
    _api(acme, upstream, bob_app, policy)
    response = gateway.get(PATH, headers={"X-API-Key": key, "Origin": "https://app.example.com"})
    assert response.status == 200
    cors = _cors_headers(response)
    assert cors["access-control-allow-origin"] == "https://app.example.com"
    assert cors.get("access-control-allow-credentials") == ("true" if credentials else None)
    assert cors["access-control-expose-headers"] == "X-Total-Count, ETag"
    assert "origin" in _vary(response)
    assert upstream.seen[0].headers["origin"] == "https://app.example.com"


def test_a_disallowed_origin_gets_no_cors_headers_and_still_reaches_the_upstream(gateway, browser_api, upstream, key):
    response = gateway.get(PATH, headers={"X-API-Key": key, "Origin": "https://evil.com"})
    assert response.status == 200
    assert _cors_headers(response) == {}
    assert "origin" in _vary(response)
    assert len(upstream.seen) == 1


def test_a_method_the_policy_does_not_allow_gets_no_cors_headers(gateway, browser_api, upstream, key):
    response = gateway.request("DELETE", PATH, headers={"X-API-Key": key, "Origin": "https://app.example.com"})
    assert response.status == 200
    assert _cors_headers(response) == {}


def test_the_gateways_own_401_and_429_carry_cors_headers(gateway, acme, upstream, bob_app, key):
    limit = services.policy_create(
        tenant=acme, name="one", policy_type="rate_limiting", config={"requests_per_minute": 1}, actor=None
    )
    _api(acme, upstream, bob_app, _cors(acme, allow_origins=["https://app.example.com"]), limit)
    origin = {"Origin": "https://app.example.com"}
    unauthenticated = gateway.get(PATH, headers=origin)
    assert unauthenticated.status == 401
    assert unauthenticated.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert gateway.get(PATH, headers={**origin, "X-API-Key": key}).status == 200
    limited = gateway.get(PATH, headers={**origin, "X-API-Key": key})
    assert limited.status == 429
    assert limited.header("Access-Control-Allow-Origin") == "https://app.example.com"
    assert "origin" in _vary(limited)


def test_the_upstreams_own_cors_headers_are_replaced_and_its_vary_kept(gateway, browser_api, upstream, key):
    upstream.respond = lambda seen: Answer(
        headers=[
            ("Content-Type", "application/json"),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "GET"),
            ("Vary", "Accept-Encoding"),
        ]
    )
    response = gateway.get(PATH, headers={"X-API-Key": key, "Origin": "https://app.example.com"})
    assert response.header_all("Access-Control-Allow-Origin") == ["https://app.example.com"]
    assert response.header("Access-Control-Allow-Methods") is None
    assert _vary(response) == {"accept-encoding", "origin"}
    plain = gateway.get(PATH, headers={"X-API-Key": key})
    assert _cors_headers(plain) == {}  # no Origin: no CORS headers, the upstream's "*" is gone too
    assert "origin" in _vary(plain)


def test_an_options_request_that_is_no_preflight_goes_to_the_upstream(gateway, browser_api, upstream, key):
    response = gateway.request("OPTIONS", PATH, headers={"X-API-Key": key, "Origin": "https://app.example.com"})
    assert response.status == 200
    assert upstream.seen[0].method == "OPTIONS"
    # and without a key it is an ordinary unauthenticated request
    assert gateway.request("OPTIONS", PATH, headers={"Origin": "https://app.example.com"}).status == 401


def test_an_invalid_stored_policy_adds_no_cors_headers(gateway, acme, upstream, bob_app, key, caplog):
    policy = _cors(acme, allow_origins=["https://app.example.com"])
    _api(acme, upstream, bob_app, policy)
    Policy.objects.filter(pk=policy.pk).update(config={"allow_origins": "https://app.example.com"})
    with caplog.at_level("ERROR", logger="gateway.policies.cors"):
        response = _preflight(gateway, "https://app.example.com")
    assert response.status == 401  # no cors step: the preflight is an unauthenticated request like any other
    assert _cors_headers(response) == {}
    assert "is invalid and does not apply" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_cors_ip_rules_and_headers_together_under_gunicorn(live_env, tmp_path, acme, bob_app, key):
    # One worker behind a trusted proxy on loopback: what a browser, a proxy and the upstream see on the wire.
    env = {**live_env, "TRUSTED_PROXIES": "127.0.0.1", "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    with recording_upstream() as upstream, gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as url:
        policies = [
            _cors(acme, allow_origins=["https://*.example.com"], allow_credentials=True),
            services.policy_create(
                tenant=acme, name="office", policy_type="ip_rules", config={"allow": ["192.0.2.0/24"]}, actor=None
            ),
            services.policy_create(
                tenant=acme,
                name="tag",
                policy_type="headers",
                config={
                    "request": {"set": {"X-Caller": "{consumer_id}@{client_ip}"}},
                    "response": {"remove": ["X-Powered-By"]},
                },
                actor=None,
            ),
        ]
        _api(acme, upstream, bob_app, *policies)
        upstream.respond = lambda seen: Answer(headers=[("Content-Type", "application/json"), ("X-Powered-By", "PHP")])
        target = url + PATH
        origin = "https://app.example.com"
        from_office = {"X-Forwarded-For": "192.0.2.10", "Origin": origin}
        preflight = requests.options(
            target,
            headers={
                **from_office,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
            timeout=5,
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == origin
        assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
        assert preflight.headers["Access-Control-Allow-Headers"] == "x-api-key"
        response = requests.post(target, headers={**from_office, "X-API-Key": key}, json={}, timeout=5)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "X-Powered-By" not in response.headers
        assert upstream.seen[-1].headers["x-caller"] == f"{bob_app.pk}@192.0.2.10"
        refused = requests.get(
            target, headers={"X-Forwarded-For": "203.0.113.5", "Origin": origin, "X-API-Key": key}, timeout=5
        )
        assert refused.status_code == 403
        assert refused.json()["client_ip"] == "203.0.113.5"
        assert refused.headers["Access-Control-Allow-Origin"] == origin  # the page can read why
        assert len(upstream.seen) == 1
