"""restrict_to_spec: an API answers only the operations of its OpenAPI document (404 other paths, 405 other methods),
checked before any key look-up; APIs without it route every path as before."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from apimgmt import services
from apimgmt.models import Consumer, Tenant
from tests.config.specs import large_spec
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Recorder

pytestmark = pytest.mark.django_db


@pytest.fixture
def pets(acme: Tenant, upstream: Recorder, bob_app: Consumer) -> Any:
    api = publish(
        acme, upstream.url + "/svc", base_path="/pets", openapi_spec=large_spec(resources=3), restrict_to_spec=True
    )
    subscribe(bob_app, api)
    return api


@pytest.mark.parametrize(
    ("method", "path", "upstream_path"),
    [
        ("GET", "/pets/res1", "/svc/res1"),
        ("POST", "/pets/res1", "/svc/res1"),
        ("GET", "/pets/res2/mine", "/svc/res2/mine"),
        ("GET", "/pets/res2/42?limit=5", "/svc/res2/42?limit=5"),
        ("PUT", "/pets/res0/mine/photos", "/svc/res0/mine/photos"),
    ],
)
def test_operations_of_the_spec_are_proxied(
    gateway: InProcessGateway, pets: Any, upstream: Recorder, key: str, method: str, path: str, upstream_path: str
) -> None:
    r = gateway.request(method, path, headers={"X-API-Key": key})
    assert r.status == 200, r.body
    assert upstream.paths == [upstream_path]


def test_a_path_outside_the_spec_is_a_404_before_any_key_is_looked_up(
    gateway: InProcessGateway, pets: Any, upstream: Recorder, key: str
) -> None:
    for headers in ({"X-API-Key": key}, {}):
        r = gateway.get("/pets/res9", headers=headers)
        assert r.status == 404
        assert r.header("Content-Type") == "application/problem+json"
        assert r.json()["detail"] == "This API's OpenAPI document has no such path."
    assert upstream.paths == []


def test_a_method_the_path_lacks_is_a_405_with_allow(
    gateway: InProcessGateway, pets: Any, upstream: Recorder, key: str
) -> None:
    r = gateway.request("DELETE", "/pets/res1", headers={"X-API-Key": key})
    assert r.status == 405
    assert r.header("Allow") == "GET, HEAD, POST"
    assert r.json()["detail"] == "DELETE is not an operation of /res1 in this API's OpenAPI document."
    assert upstream.paths == []


def test_without_restrict_to_spec_every_path_is_routed(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder, bob_app: Consumer, key: str
) -> None:
    api = publish(acme, upstream.url + "/svc", base_path="/pets", openapi_spec=large_spec(resources=1))
    subscribe(bob_app, api)
    assert gateway.request("DELETE", "/pets/anything", headers={"X-API-Key": key}).status == 200
    assert upstream.paths == ["/svc/anything"]


def test_restrict_to_spec_needs_a_spec_with_paths(acme: Tenant) -> None:
    with pytest.raises(ValidationError) as refused:
        services.api_create(
            tenant=acme,
            api_name="x",
            base_path="/x",
            upstream_url="https://x.example.com",
            restrict_to_spec=True,
            actor=None,
        )
    assert refused.value.message_dict == {
        "restrict_to_spec": ["restrict_to_spec needs an OpenAPI document with paths (openapi_spec)."]
    }


def test_a_cors_preflight_is_checked_against_the_method_it_asks_about_and_answered_by_the_cors_policy(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder
) -> None:
    cors = services.policy_create(
        tenant=acme,
        name="browsers",
        policy_type="cors",
        config={"allow_origins": ["https://app.example.com"], "allow_methods": ["GET", "POST", "PUT"]},
        actor=None,
    )
    publish(
        acme,
        upstream.url + "/svc",
        base_path="/pets",
        openapi_spec=large_spec(resources=3),
        restrict_to_spec=True,
        policies=[cors],
    )

    def preflight(path: str, method: str) -> Any:
        headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": method}
        return gateway.request("OPTIONS", path, headers=headers)

    allowed = preflight("/pets/res1", "POST")  # the document has POST /res1; OPTIONS itself it does not list
    assert allowed.status == 204
    assert allowed.header("Access-Control-Allow-Origin") == "https://app.example.com"
    refused = preflight("/pets/res1", "DELETE")  # not an operation of the document
    assert refused.status == 405
    assert "DELETE" in refused.json()["detail"]
    assert preflight("/pets/nowhere", "GET").status == 404
    assert upstream.seen == []
