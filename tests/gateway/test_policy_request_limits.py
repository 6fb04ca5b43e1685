"""request_limits: methods (405 with Allow), body size (413 before the upstream), header count and size (431)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from apimgmt import services
from apimgmt.models import Api, Consumer, Policy, Tenant
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import Recorder

pytestmark = pytest.mark.django_db

PATH = "/api/users/v1/x"


def _limits(tenant: Tenant, **config: Any) -> Policy:
    mode = config.pop("mode", Policy.Mode.ENFORCE)
    return services.policy_create(
        tenant=tenant, name="limits", policy_type="request_limits", config=config, actor=None, mode=mode
    )


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy) -> Api:
    api = publish(tenant, upstream.url, policies=list(policies))
    subscribe(consumer, api)
    return api


def _problem(response: Any, status: int, slug: str) -> str:
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/problem+json"
    assert response.json()["type"].endswith(slug)
    return str(response.json()["detail"])


def test_a_method_outside_the_list_gets_405_with_allow_before_authentication(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, allowed_methods=["GET", "post"]))
    refused = gateway.request("DELETE", PATH, headers={"X-API-Key": key})
    assert "DELETE" in _problem(refused, 405, "method-not-allowed")
    assert refused.header("Allow") == "GET, POST"
    _problem(gateway.request("PUT", PATH), 405, "method-not-allowed")  # no key needed to learn that
    assert upstream.seen == []
    assert gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"{}").status == 200
    assert gateway.get(PATH, headers={"X-API-Key": key}).status == 200
    assert [s.method for s in upstream.seen] == ["POST", "GET"]


def test_a_content_length_over_the_cap_gets_413_before_anything_is_sent(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, max_body_bytes=1000))
    too_big = gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 1001)
    assert "at most 1000 bytes" in _problem(too_big, 413, "body-too-large")
    # before authentication: an anonymous client cannot make the gateway read a large body either
    _problem(gateway.request("POST", PATH, body=b"x" * 5000), 413, "body-too-large")
    assert upstream.seen == []
    assert gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 1000).status == 200
    assert len(upstream.seen[0].body) == 1000


def test_a_chunked_body_is_cut_off_with_413_as_it_crosses_the_cap(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, max_body_bytes=100_000))
    too_big = gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 100_001, chunked=True)
    assert "at most 100000 bytes" in _problem(too_big, 413, "body-too-large")
    time.sleep(0.1)
    assert upstream.seen == []  # the upstream never saw a complete request
    at_cap = gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 100_000, chunked=True)
    assert at_cap.status == 200
    assert len(upstream.seen[0].body) == 100_000


def test_the_gateways_own_cap_still_applies_when_the_apis_is_larger(
    gateway, settings_gateway, acme, upstream, bob_app, key
):
    settings_gateway(MAX_BODY_BYTES=2000)
    _api(acme, upstream, bob_app, _limits(acme, max_body_bytes=1_000_000))
    too_big = gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 3000, chunked=True)
    assert "at most 2000 bytes" in _problem(too_big, 413, "body-too-large")


def test_a_cap_of_zero_refuses_any_body(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, max_body_bytes=0))
    _problem(gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x"), 413, "body-too-large")
    assert gateway.request("POST", PATH, headers={"X-API-Key": key}).status == 200


def test_too_many_header_fields_get_431(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, max_headers=5))
    # Host and X-API-Key are two; three more make five
    fine = gateway.get(PATH, headers={"X-API-Key": key, "A": "1", "B": "2", "C": "3"})
    assert fine.status == 200
    refused = gateway.get(PATH, headers={"X-API-Key": key, "A": "1", "B": "2", "C": "3", "D": "4"})
    assert "6 header fields" in _problem(refused, 431, "headers-too-large")
    assert len(upstream.seen) == 1


def test_header_fields_over_the_byte_cap_get_431(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _limits(acme, max_header_bytes=2048))
    assert gateway.get(PATH, headers={"X-API-Key": key, "Cookie": "c" * 1000}).status == 200
    refused = gateway.get(PATH, headers={"X-API-Key": key, "Cookie": "c" * 2100})
    assert "at most 2048" in _problem(refused, 431, "headers-too-large")
    assert len(upstream.seen) == 1


def test_shadow_mode_only_logs(gateway, acme, upstream, bob_app, key, caplog):
    _api(acme, upstream, bob_app, _limits(acme, allowed_methods=["GET"], max_body_bytes=10, mode=Policy.Mode.SHADOW))
    with caplog.at_level("INFO", logger="gateway.policies.request_limits"):
        assert gateway.request("POST", PATH, headers={"X-API-Key": key}, body=b"x" * 100).status == 200
    assert "would have answered 405" in caplog.text
    assert len(upstream.seen[0].body) == 100


def test_a_preflight_is_answered_by_cors_before_the_method_list(gateway, acme, upstream, bob_app):
    cors = services.policy_create(
        tenant=acme,
        name="browser",
        policy_type="cors",
        config={"allow_origins": ["https://app.example.com"]},
        actor=None,
    )
    _api(acme, upstream, bob_app, cors, _limits(acme, allowed_methods=["GET", "POST"]))
    preflight = gateway.request(
        "OPTIONS", PATH, headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status == 204
    # the refusal is readable by the browser page (the cors step ran before it) when cors allows the method
    patch = gateway.request("PATCH", PATH, headers={"Origin": "https://app.example.com"})
    assert patch.status == 405 and patch.header("Access-Control-Allow-Origin") == "https://app.example.com"
    purge = gateway.request("PURGE", PATH, headers={"Origin": "https://app.example.com"})
    assert purge.status == 405 and purge.header("Access-Control-Allow-Origin") is None  # not a cors method
