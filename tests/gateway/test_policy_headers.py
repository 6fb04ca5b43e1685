"""headers: request headers edited towards the upstream, response headers towards the client, templates per request."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from apimgmt import services
from apimgmt.models import Api, Consumer, Policy, Tenant
from gateway.chain import Exchange, Finished
from gateway.policies import headers
from gateway.wsgi import get_gateway
from tests.gateway.conftest import publish, subscribe
from tests.gateway.jwt_support import ISS, bearer, publish_for_tokens, rsa_key
from tests.gateway.upstreams import Answer, Recorder

pytestmark = pytest.mark.django_db

PATH = "/api/users/v1/x"


def _headers(tenant: Tenant, name: str = "transforms", **config: Any) -> Policy:
    return services.policy_create(tenant=tenant, name=name, policy_type="headers", config=config, actor=None)


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy) -> Api:
    api = publish(tenant, upstream.url, policies=list(policies))
    subscribe(consumer, api)
    return api


def test_request_headers_are_removed_then_set_then_added(gateway, acme, upstream, bob_app, key):
    policy = _headers(
        acme,
        request={
            "remove": ["X-Debug"],
            "set": {"X-Env": "production"},
            "add": {"X-Client-Version": "unknown", "X-Source": "gateway"},
        },
    )
    _api(acme, upstream, bob_app, policy)
    sent = {"X-API-Key": key, "x-debug": "1", "X-ENV": "staging", "X-Client-Version": "2.1"}
    assert gateway.get(PATH, headers=sent).status == 200
    seen = upstream.seen[0]
    assert "x-debug" not in seen.headers  # removed, whatever its case
    assert seen.headers["x-env"] == "production"  # set replaces the client's value
    assert [v for k, v in seen.header_list if k.lower() == "x-env"] == ["production"]  # once
    assert seen.headers["x-client-version"] == "2.1"  # add never overrides what the client sent
    assert seen.headers["x-source"] == "gateway"


def test_templates_are_rendered_per_request(gateway, acme, upstream, bob_app, bob_key):
    api_key, key = bob_key
    policy = _headers(
        acme,
        request={
            "set": {
                "X-Caller": "{consumer_id}/{key_id}",
                "X-Where": "{tenant_id}:{api_id}",
                "X-Trace": "req={request_id}",
                "X-Client": "{client_ip}",
                "X-Literal": "{{consumer_id}}",
            }
        },
    )
    api = _api(acme, upstream, bob_app, policy)
    response = gateway.get(PATH, headers={"X-API-Key": key}, remote_addr="192.0.2.44")
    seen = upstream.seen[0].headers
    assert seen["x-caller"] == f"{bob_app.pk}/{api_key.key_id}"
    assert seen["x-where"] == f"{acme.pk}:{api.pk}"
    assert seen["x-trace"] == f"req={response.header('X-Request-ID')}"
    assert seen["x-client"] == "192.0.2.44"
    assert seen["x-literal"] == "{consumer_id}"
    gateway.get(PATH, headers={"X-API-Key": key, "X-Request-ID": "second-request"})
    assert upstream.seen[1].headers["x-trace"] == "req=second-request"


def test_response_headers_are_edited_on_the_upstreams_answer(gateway, acme, upstream, bob_app, key):
    upstream.respond = lambda seen: Answer(
        headers=[
            ("Content-Type", "application/json"),
            ("X-Powered-By", "Express"),
            ("Cache-Control", "public, max-age=60"),
            ("X-Frame-Options", "SAMEORIGIN"),
        ]
    )
    policy = _headers(
        acme,
        response={
            "remove": ["x-powered-by"],
            "set": {"Cache-Control": "no-store"},
            "add": {"X-Frame-Options": "DENY", "X-Served-For": "{consumer_id}"},
        },
    )
    _api(acme, upstream, bob_app, policy)
    response = gateway.get(PATH, headers={"X-API-Key": key})
    assert response.status == 200
    assert response.header("X-Powered-By") is None
    assert response.header_all("Cache-Control") == ["no-store"]
    assert response.header_all("X-Frame-Options") == ["SAMEORIGIN"]  # the upstream's own is kept
    assert response.header("X-Served-For") == bob_app.pk


def test_the_gateways_own_answers_are_left_alone(gateway, acme, upstream, bob_app, key):
    policy = _headers(acme, response={"set": {"Cache-Control": "public, max-age=3600"}, "add": {"X-Api": "users"}})
    _api(acme, upstream, bob_app, policy)
    refused = gateway.get(PATH)  # no key: the gateway's 401
    assert refused.status == 401
    assert refused.header("Cache-Control") == "no-store"
    assert refused.header("X-Api") is None
    assert gateway.get(PATH, headers={"X-API-Key": key}).header("X-Api") == "users"


def test_a_plans_headers_apply_to_its_subscribers_after_the_apis(gateway, acme, upstream, bob_app, key, bob):
    api_policy = _headers(acme, "api", request={"set": {"X-Tier": "standard", "X-Api": "users"}})
    plan_policy = _headers(acme, "gold", request={"set": {"X-Tier": "gold"}}, response={"add": {"X-Plan": "gold"}})
    gold = services.plan_create(tenant=acme, name="gold", actor=None, policies=[plan_policy])
    free = services.plan_create(tenant=acme, name="free", actor=None)
    api = publish(acme, upstream.url, policies=[api_policy], plans=[gold, free])
    subscribe(bob_app, api, gold)
    other = services.consumer_create(tenant=acme, name="other app", actor=None, owner=bob)
    subscribe(other, api, free)
    _, other_key = services.api_key_create(consumer=other, actor=None)
    gold_answer = gateway.get(PATH, headers={"X-API-Key": key})
    free_answer = gateway.get(PATH, headers={"X-API-Key": other_key})
    assert upstream.seen[0].headers["x-tier"] == "gold"  # the plan's set runs after the API's
    assert upstream.seen[0].headers["x-api"] == "users"
    assert upstream.seen[1].headers["x-tier"] == "standard"
    assert gold_answer.header("X-Plan") == "gold"
    assert free_answer.header("X-Plan") is None


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        ({"request": {"set": {"X-Evil": "a\r\nX-Injected: 1"}}}, "request.set.X-Evil", "line break"),
        ({"response": {"add": {"X-Evil": "a\nSet-Cookie: s=1"}}}, "response.add.X-Evil", "line break"),
        ({"request": {"set": {"X-Evil": "a\x00b"}}}, "request.set.X-Evil", "control character"),
        ({"request": {"set": {"Connection": "close"}}}, "request.set", "hop-by-hop"),
        ({"request": {"remove": ["Transfer-Encoding"]}}, "request.remove[0]", "hop-by-hop"),
        ({"response": {"set": {"Upgrade": "h2c"}}}, "response.set", "hop-by-hop"),
        ({"request": {"set": {"Host": "internal"}}}, "request.set", "Host"),
        ({"request": {"set": {"X-Forwarded-For": "1.2.3.4"}}}, "request.set", "X-Forwarded-For"),
        ({"request": {"remove": ["Authorization"]}}, "request.remove[0]", "credential"),
        ({"request": {"set": {"Bad Name": "x"}}}, "request.set", "not an HTTP header name"),
        ({"request": {"set": {"X-A": "{password}"}}}, "request.set.X-A", "unknown template"),
    ],
)
def test_injection_and_hop_by_hop_names_are_refused_when_the_policy_is_saved(acme, config, field, reason):
    with pytest.raises(ValidationError) as caught:
        _headers(acme, **config)
    message = " ".join(caught.value.messages)
    assert field in message and reason in message


def test_the_apis_key_header_cannot_be_touched(acme, upstream):
    policy = _headers(acme, request={"set": {"X-Partner-Key": "forged"}})
    with pytest.raises(ValidationError, match="X-Partner-Key"):
        publish(acme, upstream.url, policies=[policy], key_header="X-Partner-Key")


def test_an_old_row_with_crlf_or_a_hop_by_hop_name_never_reaches_the_upstream(
    gateway, acme, upstream, bob_app, key, caplog
):
    smuggler = _headers(acme, "smuggler", request={"set": {"X-Ok": "fine"}})
    hop = _headers(acme, "hop", request={"set": {"X-Ok-Too": "fine"}})
    _api(acme, upstream, bob_app, smuggler, hop)
    # rows written before validation existed, or edited in the database
    Policy.objects.filter(pk=smuggler.pk).update(config={"request": {"set": {"X-Ok": "a\r\nX-Injected: 1"}}})
    Policy.objects.filter(pk=hop.pk).update(config={"request": {"set": {"Transfer-Encoding": "chunked"}}})
    with caplog.at_level("ERROR", logger="gateway.policies.headers"):
        assert gateway.get(PATH, headers={"X-API-Key": key}).status == 200
    seen = upstream.seen[0]
    assert "x-injected" not in seen.headers and "x-ok" not in seen.headers
    assert "transfer-encoding" not in seen.headers
    assert "policy smuggler" in caplog.text and "policy hop" in caplog.text


def _exchange(claims: dict[str, Any] | None) -> Exchange:
    route = get_gateway().routes.current().resolve("", PATH)
    assert route is not None
    ex = Exchange(get_gateway(), {}, route, "GET", PATH, "", "req-9", "192.0.2.1", Finished("req-9", "GET", 0.0))
    ex.claims = claims
    return ex


def test_jwt_claims_render_and_an_unsafe_claim_is_never_written(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app)
    gateway.get(PATH, headers={"X-API-Key": key})  # load the route table
    ops = headers.Operations(
        {"remove": [], "add": {}, "set": {"X-User": "{jwt.sub}", "X-Org": "org={jwt.org.id}", "X-Scope": "{jwt.scp}"}}
    )
    sent: dict[str, str] = {}
    ops.apply_request(_exchange({"sub": "user-1", "org": {"id": 7}, "scp": ["read", "write"]}), sent)
    assert sent == {"X-User": "user-1", "X-Org": "org=7", "X-Scope": "read,write"}
    # a claim is the caller's text: CR/LF, other control characters or non-ASCII never become a header value
    for evil in ("x\r\nX-Injected: 1", "x\nY", "a\x00b", "caf\u00e9", "x" * 9000):
        sent = {}
        ops.apply_request(_exchange({"sub": evil, "org": {"id": evil}, "scp": [evil]}), sent)
        assert sent == {}, evil
    # a key-authenticated call has no claims: headers that need one are not written
    sent = {}
    ops.apply_request(_exchange(None), sent)
    assert sent == {}


def test_an_api_without_headers_policies_has_no_step(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app)
    assert gateway.get(PATH, headers={"X-API-Key": key}).status == 200
    route = get_gateway().routes.current().resolve("", PATH)
    assert route is not None and route.chain.empty


def test_a_jwt_claim_with_crlf_never_reaches_the_upstream(gateway, acme, upstream, bob_app):
    signer = rsa_key("k1")
    issuer = services.jwt_issuer_create(
        tenant=acme, name="idp", issuer=ISS, audiences=["users"], public_keys={"keys": [signer.jwk]}, actor=None
    )
    policy = _headers(acme, request={"set": {"X-User": "{jwt.sub}", "X-Name": "{jwt.name}", "X-Org": "{jwt.org.id}"}})
    publish_for_tokens(acme, upstream.url, bob_app, issuer, policies=[policy])
    token = signer.token(aud="users", name="Mallory\r\nX-Injected: 1", org={"id": "org-7"})
    response = gateway.get(PATH, headers=bearer(token))
    assert response.status == 200, response.body
    seen = upstream.seen[0]
    assert seen.headers["x-user"] == "user-1"
    assert seen.headers["x-org"] == "org-7"
    assert "x-name" not in seen.headers and "x-injected" not in seen.headers
    assert all("\r" not in v and "\n" not in v for _, v in seen.header_list)
