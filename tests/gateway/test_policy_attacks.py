"""Attacks on the gateway's cors, ip_rules, headers and request_limits policies, each answered as a user would see it.

Every test names the trick it tries. Some pin a defence that already held; the others failed before the fix they
come with (a dual-stack listener's IPv4-mapped proxy address, a shadow policy that cannot be compiled, method
override headers, transforms forging the caller's identity or the CORS answer).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from apimgmt import services
from apimgmt.models import Api, Consumer, Policy, Tenant
from tests.gateway.conftest import publish, reload_routes, subscribe
from tests.gateway.upstreams import Answer, Recorder

pytestmark = pytest.mark.django_db

PATH = "/api/users/v1/x"


def _policy(tenant: Tenant, policy_type: str, name: str | None = None, **config: Any) -> Policy:
    mode = config.pop("mode", Policy.Mode.ENFORCE)
    return services.policy_create(
        tenant=tenant, name=name or policy_type, policy_type=policy_type, config=config, actor=None, mode=mode
    )


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy, **options: Any) -> Api:
    api = publish(tenant, upstream.url, policies=list(policies), **options)
    subscribe(consumer, api)
    return api


def _problem(response: Any, status: int, slug: str) -> str:
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/problem+json"
    assert response.json()["type"].endswith(slug)
    return str(response.json()["detail"])


def _vary(response: Any) -> set[str]:
    return {token.strip().lower() for value in response.header_all("Vary") for token in value.split(",")}


# -- CORS ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),  # the same origin in capitals (scheme and host are case-insensitive)
        ("https://a.b.example.org", True),
        ("https://app.example.com.", False),  # a trailing dot is another origin to a browser
        ("https://app.example.com:443", False),  # a browser never sends the default port; no other port either
        ("https://app.example.com:8443", False),
        ("http://app.example.com", False),  # the scheme counts
        ("https://app.example.com.evil.org", False),  # suffix trick
        ("https://evilapp.example.com", False),  # exact origins are exact
        ("https://evilexample.org", False),  # "*.example.org" is no suffix match
        ("https://example.org", False),  # nor the domain itself
        ("https://.example.org", False),  # an empty label
        ("https://a..example.org", False),
        ("https://a_b.example.org", False),
        ("https://xn--bcher-kva.example.org", True),  # punycode is a label like any other
        ("https://b\u00fccher.example.org", False),  # a browser never sends Unicode
        ("https://a.example.org/", False),
        ("https://a.example.org@evil.org", False),
        ("https://evil.org#.example.org", False),
        ("null", False),  # sandboxed frames, file: pages
        ("", False),
        ("*", False),
    ],
)
def test_cors_origin_tricks(gateway, acme, upstream, bob_app, key, origin, allowed):
    policy = _policy(
        acme,
        "cors",
        allow_origins=["https://app.example.com", "https://*.example.org"],
        allow_credentials=True,
    )
    _api(acme, upstream, bob_app, policy)
    preflight = gateway.request("OPTIONS", PATH, headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    actual = gateway.get(PATH, headers={"X-API-Key": key, "Origin": origin})
    assert actual.status == 200  # a disallowed origin still reaches the upstream, just without CORS headers
    if allowed:
        assert preflight.status == 204
        assert preflight.header("Access-Control-Allow-Origin") == origin
        assert actual.header_all("Access-Control-Allow-Origin") == [origin]
        assert actual.header("Access-Control-Allow-Credentials") == "true"
    else:
        assert preflight.status == 403
        for response in (preflight, actual):
            assert not [name for name, _ in response.headers if name.lower().startswith("access-control-")]
    assert "origin" in _vary(preflight) and "origin" in _vary(actual)


def test_cors_with_credentials_never_answers_star_and_a_preflight_for_an_unlisted_header_is_refused(
    gateway, acme, upstream, bob_app, key
):
    with pytest.raises(ValidationError, match="allow_credentials"):
        _policy(acme, "cors", allow_origins=["*"], allow_credentials=True)
    policy = _policy(acme, "cors", allow_origins=["https://app.example.com"], allow_credentials=True)
    _api(acme, upstream, bob_app, policy)
    ok = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    # the key header and the safelisted ones may always be asked for; anything else is refused, whatever its case
    allowed = gateway.request(
        "OPTIONS", PATH, headers={**ok, "Access-Control-Request-Headers": "x-api-key, Content-Type"}
    )
    assert allowed.status == 204
    assert allowed.header("Access-Control-Allow-Origin") == "https://app.example.com"
    for asked in ("X-Admin", "content-type, X-Admin", "X-API-Key,,x-admin"):
        refused = gateway.request("OPTIONS", PATH, headers={**ok, "Access-Control-Request-Headers": asked})
        assert "x-admin" in _problem(refused, 403, "cors-refused")
        assert refused.header("Access-Control-Allow-Origin") is None
        assert refused.header("Access-Control-Allow-Headers") is None
    assert upstream.seen == []


def test_the_upstreams_cors_headers_never_leak_in_any_spelling(gateway, acme, upstream, bob_app, key):
    policy = _policy(acme, "cors", allow_origins=["https://app.example.com"])
    _api(acme, upstream, bob_app, policy)
    upstream.respond = lambda seen: Answer(
        headers=[
            ("access-control-allow-origin", "*"),
            ("ACCESS-CONTROL-ALLOW-CREDENTIALS", "true"),
            ("Access-Control-Expose-Headers", "X-Secret"),
        ]
    )
    for origin in ("https://evil.org", "https://app.example.com"):
        response = gateway.get(PATH, headers={"X-API-Key": key, "Origin": origin})
        cors = [(n.lower(), v) for n, v in response.headers if n.lower().startswith("access-control-")]
        expected = [("access-control-allow-origin", origin)] if origin != "https://evil.org" else []
        assert cors == expected


# -- IP rules ------------------------------------------------------------------------------------------------------


def _refused(response: Any, address: str) -> None:
    assert response.status == 403, response.body
    assert response.json()["type"].endswith("ip-refused")
    assert response.json()["client_ip"] == address


def test_a_trusted_proxy_on_a_dual_stack_listener_is_still_trusted(
    gateway, settings_gateway, acme, upstream, bob_app, key
):
    # gunicorn bound to [::] hands IPv4 peers over as IPv4-mapped IPv6 addresses. The proxy 10.0.0.5 then arrives as
    # ::ffff:10.0.0.5: it is still the trusted proxy, and the client it names is the one checked. Before the fix the
    # proxy was not recognised, so every client looked like the proxy itself: an allow list of the internal network
    # let the whole internet in, and a deny list refused no one.
    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    rules = _policy(acme, "ip_rules", allow=["10.0.0.0/8", "192.0.2.0/24"], deny=["192.0.2.66"])
    _api(acme, upstream, bob_app, rules)
    sent = {"X-API-Key": key}
    _refused(
        gateway.get(PATH, headers={**sent, "X-Forwarded-For": "203.0.113.9"}, remote_addr="::ffff:10.0.0.5"),
        "203.0.113.9",
    )
    _refused(
        gateway.get(PATH, headers={**sent, "X-Forwarded-For": "192.0.2.66"}, remote_addr="::ffff:10.0.0.5"),
        "192.0.2.66",
    )
    assert (
        gateway.get(PATH, headers={**sent, "X-Forwarded-For": "192.0.2.7"}, remote_addr="::ffff:10.0.0.5").status == 200
    )
    # a hop written by a mapped trusted proxy is skipped like any trusted hop
    hops = "203.0.113.9, ::ffff:10.1.1.1"
    _refused(gateway.get(PATH, headers={**sent, "X-Forwarded-For": hops}, remote_addr="10.0.0.5"), "203.0.113.9")
    # the upstream hears of the real client too
    assert upstream.seen[-1].headers["x-forwarded-for"].startswith("192.0.2.7")
    # an untrusted mapped peer still cannot claim another address
    _refused(
        gateway.get(PATH, headers={**sent, "X-Forwarded-For": "10.0.0.9"}, remote_addr="::ffff:198.51.100.1"),
        "::ffff:198.51.100.1",
    )


def test_forwarded_for_tricks_from_untrusted_and_trusted_peers(gateway, settings_gateway, acme, upstream, bob_app, key):
    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    _api(acme, upstream, bob_app, _policy(acme, "ip_rules", allow=["192.0.2.0/24"]))
    sent = {"X-API-Key": key}
    # an untrusted peer: nothing it writes is believed (two headers arrive joined with a comma)
    for forged in ("192.0.2.1", "192.0.2.1,192.0.2.2", "192.0.2.1, 10.0.0.1", "unknown, 192.0.2.1"):
        _refused(
            gateway.get(PATH, headers={**sent, "X-Forwarded-For": forged}, remote_addr="203.0.113.5"), "203.0.113.5"
        )
    # behind the trusted proxy, what the client put in front of the proxy's own entry is never reached
    response = gateway.get(PATH, headers={**sent, "X-Forwarded-For": "192.0.2.1, 203.0.113.5"}, remote_addr="10.0.0.5")
    _refused(response, "203.0.113.5")
    # garbage where the proxy's entry should be stops at the proxy: refused as the proxy, never as a made-up address
    for garbage in (
        "192.0.2.1, 010.0.0.1",
        "192.0.2.1, 203.0.113.5:80",
        "192.0.2.1, 203.0.113.5 x",
        "192.0.2.1, [::1]",
    ):
        _refused(gateway.get(PATH, headers={**sent, "X-Forwarded-For": garbage}, remote_addr="10.0.0.5"), "10.0.0.5")


def test_ipv6_forms_and_cidr_edges(gateway, acme, upstream, bob_app, key):
    rules = _policy(acme, "ip_rules", allow=["0.0.0.0/0", "2001:db8::1/128"], deny=["192.0.2.1/32", "10.0.0.0/8"])
    _api(acme, upstream, bob_app, rules)

    def status(addr: str) -> int:
        return gateway.get(PATH, headers={"X-API-Key": key}, remote_addr=addr).status

    assert status("198.51.100.1") == 200  # /0 allows every IPv4 address
    assert status("192.0.2.1") == 403 and status("192.0.2.2") == 200  # /32 is one address
    assert status("2001:db8::1") == 200 and status("2001:db8::2") == 403  # /128 is one address
    assert status("2001:db8::1%eth0") == 200 and status("fe80::1%eth0") == 403  # a zone id changes nothing
    assert status("::ffff:10.1.2.3") == 403 and status("::ffff:192.0.2.1") == 403  # mapped: its IPv4 address
    assert status("::ffff:198.51.100.1") == 200
    assert status("not-an-address") == 403 and status("") == 403  # unreadable: refused by any list
    with pytest.raises(ValidationError, match=r"010\.0\.0\.1"):
        _policy(acme, "ip_rules", "zeros", deny=["010.0.0.1"])
    with pytest.raises(ValidationError, match="host bits"):
        _policy(acme, "ip_rules", "bits", deny=["10.0.0.1/8"])


def test_a_shadow_ip_rules_policy_that_cannot_be_compiled_never_refuses(gateway, acme, upstream, bob_app, key, caplog):
    # Shadow mode means "never block". A shadow policy whose stored config cannot be compiled answered every request
    # with 503 before the fix; an enforced one still fails closed.
    shadow = _policy(acme, "ip_rules", "trial", allow=["192.0.2.0/24"], mode=Policy.Mode.SHADOW)
    _api(acme, upstream, bob_app, shadow)
    Policy.objects.filter(pk=shadow.pk).update(config={"allow": ["192.0.2.0/24", "not a network"]})
    with caplog.at_level("ERROR", logger="gateway.policies.ip_rules"):
        assert gateway.get(PATH, headers={"X-API-Key": key}, remote_addr="203.0.113.1").status == 200
    assert "cannot be compiled" in caplog.text
    Policy.objects.filter(pk=shadow.pk).update(mode=Policy.Mode.ENFORCE)
    reload_routes()
    _problem(gateway.get(PATH, headers={"X-API-Key": key}, remote_addr="192.0.2.1"), 503, "ip-rules-unavailable")


# -- request limits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_a_method_override_header_cannot_reach_a_method_the_api_does_not_allow(
    gateway, acme, upstream, bob_app, key, header
):
    # Many frameworks run a POST carrying X-HTTP-Method-Override: DELETE as a DELETE: the list of allowed methods would
    # only be a list of allowed verbs on the wire. Before the fix the DELETE reached the upstream.
    _api(acme, upstream, bob_app, _policy(acme, "request_limits", allowed_methods=["GET", "POST"]))
    refused = gateway.request("POST", PATH, headers={"X-API-Key": key, header: "delete"}, body=b"{}")
    detail = _problem(refused, 405, "method-not-allowed")
    assert header in detail and "DELETE" in detail
    assert refused.header("Allow") == "GET, POST"
    assert upstream.seen == []
    # an override naming an allowed method is fine
    assert gateway.request("POST", PATH, headers={"X-API-Key": key, header: "GET"}, body=b"{}").status == 200


@pytest.mark.parametrize("method", ["get", "Get", "PROPFIND", "TRACE", "CONNECT", "DELETE "])
def test_methods_outside_the_list_in_any_spelling_are_refused(gateway, acme, upstream, bob_app, key, method):
    _api(acme, upstream, bob_app, _policy(acme, "request_limits", allowed_methods=["GET"]))
    _problem(gateway.request(method, PATH, headers={"X-API-Key": key}), 405, "method-not-allowed")
    assert upstream.seen == []


def test_body_cap_tricks(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _policy(acme, "request_limits", max_body_bytes=10))
    sent = {"X-API-Key": key}
    # lengths the gateway cannot read are refused, never taken as "no body"
    # (gunicorn itself refuses a sign, a negative length, two Content-Length fields and one with Transfer-Encoding)
    for length in ("00000000011", "+11", "11 ", "1_1", "0x20"):
        response = gateway.request("POST", PATH, headers={**sent, "Content-Length": length}, body=b"x" * 11)
        assert response.status in (400, 413), (length, response.status)
    # a chunked body (no length) is cut off as it crosses the cap, an Expect: 100-continue changes nothing
    _problem(gateway.request("POST", PATH, headers=sent, body=b"x" * 11, chunked=True), 413, "body-too-large")
    big = {**sent, "Expect": "100-continue"}
    _problem(gateway.request("POST", PATH, headers=big, body=b"x" * 11), 413, "body-too-large")
    assert upstream.seen == []


# -- header transforms ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"request": {"set": {"X-Consumer-ID": "{jwt.sub}"}}},
        {"request": {"set": {"x-consumer-id": "cons_admin"}}},
        {"request": {"remove": ["X-Consumer-Id"]}},
        {"request": {"set": {"X-Tenant-ID": "globex"}}},
        {"response": {"set": {"Access-Control-Allow-Origin": "*"}}},
        {"response": {"add": {"access-control-allow-credentials": "true"}}},
        {"response": {"remove": ["Vary"]}},
        {"response": {"set": {"Vary": "Accept"}}},
    ],
)
def test_a_transform_cannot_forge_the_caller_or_the_cors_answer(acme, config):
    with pytest.raises(ValidationError) as caught:
        _policy(acme, "headers", **config)
    message = " ".join(caught.value.messages)
    name = next(iter(next(iter(config.values())).values()))
    name = name[0] if isinstance(name, list) else next(iter(name))
    assert name in message


def test_an_old_transform_row_forging_the_caller_or_cors_never_applies(gateway, acme, upstream, bob_app, key):
    # X-Consumer-ID and X-Tenant-ID are the gateway's word to the upstream about who calls; the CORS answer and its
    # Vary: Origin belong to the cors policy (without Vary a shared cache hands one origin's answer to another).
    # Rows saved before the validator refused them are left out of the route.
    cors = _policy(acme, "cors", allow_origins=["https://app.example.com"])
    forge = _policy(acme, "headers", "forge", request={"set": {"X-Note": "x"}})
    _api(acme, upstream, bob_app, cors, forge)
    Policy.objects.filter(pk=forge.pk).update(
        config={
            "request": {"set": {"X-Consumer-ID": "cons_admin", "X-Tenant-ID": "globex"}},
            "response": {"set": {"Access-Control-Allow-Origin": "*"}, "remove": ["Vary"]},
        }
    )
    response = gateway.get(PATH, headers={"X-API-Key": key, "Origin": "https://evil.org"})
    assert response.status == 200
    assert response.header("Access-Control-Allow-Origin") is None
    assert "origin" in _vary(response)
    seen = upstream.seen[0]
    assert seen.headers["x-consumer-id"] == bob_app.pk
    assert seen.headers["x-tenant-id"] == acme.pk


def test_a_plan_transform_naming_the_apis_key_header_is_left_out_at_run_time(gateway, acme, upstream, bob_app, bob):
    # A plan's policy is checked against the key headers of the APIs it is attached to when it is saved; an API
    # published later with that key header must still never get the caller's key replaced or removed.
    policy = _policy(acme, "headers", "plan-forge", request={"set": {"X-Partner-Key": "forged", "X-Plan": "gold"}})
    plan = services.plan_create(tenant=acme, name="gold", actor=None, policies=[policy])
    api = publish(acme, upstream.url, plans=[plan], key_header="X-Partner-Key")
    subscribe(bob_app, api, plan)
    _, plaintext = services.api_key_create(consumer=bob_app, actor=None)
    response = gateway.get(PATH, headers={"X-Partner-Key": plaintext})
    assert response.status == 200, response.body
    seen = upstream.seen[0]
    assert "x-partner-key" not in seen.headers  # the credential is dropped, and never replaced by "forged"
    assert "x-plan" not in seen.headers  # the whole policy is left out


def test_a_huge_or_line_broken_jwt_claim_cannot_be_smuggled_through_a_template(acme):
    for value in ("{jwt.sub}\r\nX-Injected: 1", "x" * 1025, "{jwt.a.b.c.d.e.f}", "{jwt.}", "{ consumer_id }"):
        with pytest.raises(ValidationError):
            _policy(acme, "headers", request={"set": {"X-User": value}})
