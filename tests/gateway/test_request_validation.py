"""Request validation against the API's OpenAPI document (Api.validation): enforce answers 400 problem+json naming
each parameter or JSON pointer that failed; shadow lets the request through, counts and logs it. Tables for both
modes, on OpenAPI 3.0 and 3.1 documents, through the in-process gateway to a real upstream on loopback."""
# ruff: noqa: F811  (the version fixture of tests/gateway/openapi_documents.py is imported by name)

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from apimgmt import services
from apimgmt.models import Api, Consumer, Tenant
from gateway import request_validation
from tests.gateway.conftest import InProcessGateway
from tests.gateway.openapi_documents import pets_spec, publish_validated, version  # noqa: F401 (a fixture)
from tests.gateway.upstreams import Recorder

pytestmark = pytest.mark.django_db


VERSION = "X-Client-Version"
JSON = {"Content-Type": "application/json"}

# (method, target, headers, body) → the errors enforce lists ([] : valid, proxied).
CASES = [
    pytest.param("GET", "/pets?limit=5&tags=a&tags=b&sorted=true", {}, b"", [], id="valid-query"),
    pytest.param("GET", "/pets", {}, b"", [], id="no-optional-parameters"),
    pytest.param(
        "GET",
        "/pets?limit=50",
        {},
        b"",
        [{"in": "query", "name": "limit", "message": "50 is greater than the maximum of 10"}],
        id="query-over-maximum",
    ),
    pytest.param(
        "GET",
        "/pets?limit=five&sorted=yes",
        {},
        b"",
        [
            {"in": "query", "name": "limit", "message": "'five' is not of type 'integer'"},
            {"in": "query", "name": "sorted", "message": "'yes' is not of type 'boolean'"},
        ],
        id="query-types",
    ),
    pytest.param(
        "GET",
        "/pets?tags=a&tags=c",
        {},
        b"",
        [{"in": "query", "name": "tags", "message": "/1: 'c' is not one of ['a', 'b']"}],
        id="query-array-item",
    ),
    pytest.param("GET", "/pets/12", {VERSION: "2.1"}, b"", [], id="valid-path-and-header"),
    pytest.param(
        "GET",
        "/pets/twelve",
        {VERSION: "2.1"},
        b"",
        [{"in": "path", "name": "petId", "message": "'twelve' is not of type 'integer'"}],
        id="path-type",
    ),
    pytest.param(
        "GET",
        "/pets/12",
        {},
        b"",
        [{"in": "header", "name": "X-Client-Version", "message": "required header parameter is missing."}],
        id="header-missing",
    ),
    pytest.param(
        "GET",
        "/pets/12",
        {VERSION: "latest"},
        b"",
        [{"in": "header", "name": "X-Client-Version", "message": "'latest' does not match '^[0-9]+\\\\.[0-9]+$'"}],
        id="header-pattern",
    ),
    pytest.param("GET", "/files/report.csv", {}, b"", [], id="two-templates-in-a-segment"),
    pytest.param(
        "GET",
        "/files/quarterly-report.pdf",
        {},
        b"",
        [
            {"in": "path", "name": "name", "message": "'quarterly-report' is too long"},
            {"in": "path", "name": "ext", "message": "'pdf' is not one of ['json', 'csv']"},
        ],
        id="two-templates-both-wrong",
    ),
    pytest.param(
        "POST",
        "/pets",
        JSON,
        b'{"name": "Rex", "age": 3, "tag": null, "kind": {"lives": 9}, "toys": [{"name": "ball"}]}',
        [],
        id="valid-body",
    ),
    pytest.param(
        "POST",
        "/pets",
        JSON,
        b'{"age": -1, "toys": [{"name": ""}]}',
        [
            {"in": "body", "pointer": "/name", "message": "'name' is a required property"},
            {"in": "body", "pointer": "/age", "message": "-1 is less than the minimum of 0"},
            {"in": "body", "pointer": "/toys/0/name", "message": "'' should be non-empty"},
        ],
        id="body-pointers",
    ),
    pytest.param(
        "POST",
        "/pets",
        JSON,
        b'{"name": "Rex", "kind": {"lives": "nine"}}',
        [
            {
                "in": "body",
                "pointer": "/kind",
                "message": "{'lives': 'nine'} is not valid under any of the given schemas",
            }
        ],
        id="body-one-of",
    ),
    pytest.param(
        "POST",
        "/pets",
        {},
        b"",
        [{"in": "body", "pointer": "", "message": "a request body is required."}],
        id="body-required",
    ),
    pytest.param(
        "POST",
        "/pets",
        {"Content-Type": "text/plain"},
        b"Rex",
        [{"in": "header", "name": "Content-Type", "message": "text/plain is not one of application/json."}],
        id="body-media-type",
    ),
    pytest.param(
        "POST",
        "/pets",
        JSON,
        b'{"name": "Rex",',
        [
            {
                "in": "body",
                "pointer": "",
                "message": "not valid JSON: Expecting property name enclosed in double quotes: ",
            }
        ],
        id="body-not-json",
    ),
    pytest.param(
        "PATCH",
        "/pets/12",
        {"Content-Type": "application/merge-patch+json; charset=utf-8"},
        b'{"name": 7}',
        [{"in": "body", "pointer": "/name", "message": "7 is not of type 'string'"}],
        id="json-suffix-media-type",
    ),
    pytest.param("PATCH", "/pets/12", {"Content-Type": "text/plain"}, b"anything", [], id="non-json-body-not-parsed"),
    pytest.param("DELETE", "/pets/12", {}, b"", [], id="operation-not-in-the-document-is-left-alone"),
    pytest.param("GET", "/elsewhere?limit=x", {}, b"", [], id="path-not-in-the-document-is-left-alone"),
]


def _publish(tenant: Tenant, upstream: Recorder, consumer: Consumer, validation: str, version: str) -> Api:
    return publish_validated(tenant, upstream, consumer, pets_spec(version), base_path="/zoo", validation=validation)


def _failures(api: Api, mode: str) -> float:
    return REGISTRY.get_sample_value("api_request_validation_failures_total", {"api": api.pk, "mode": mode}) or 0


def _matches(got: list[dict[str, str]], expected: list[dict[str, str]]) -> bool:
    """Same places in the same order; each message starts with the expected text (the JSON parser's position and
    the like follow)."""
    return len(got) == len(expected) and all(
        {k: v for k, v in g.items() if k != "message"} == {k: v for k, v in e.items() if k != "message"}
        and g["message"].startswith(e["message"])
        for g, e in zip(got, expected, strict=True)
    )


@pytest.mark.parametrize(("method", "target", "headers", "body", "errors"), CASES)
def test_enforce(
    gateway: InProcessGateway,
    acme: Tenant,
    upstream: Recorder,
    bob_app: Consumer,
    key: str,
    version: str,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    errors: list[dict[str, str]],
) -> None:
    api = _publish(acme, upstream, bob_app, "enforce", version)
    before = _failures(api, "enforce")

    response = gateway.request(method, "/zoo" + target, headers={"X-API-Key": key, **headers}, body=body)

    if not errors:
        assert response.status == 200, response.body
        assert len(upstream.seen) == 1 and upstream.seen[0].body == body  # the body read is passed on as it was
        assert _failures(api, "enforce") == before
        return
    assert response.status == 400, response.body
    assert response.header("Content-Type") == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:apimgmt:problem:request-invalid"
    assert _matches(problem["errors"], errors), problem["errors"]
    first = errors[0]
    assert f"{first['in']} {first.get('name', first.get('pointer'))!r}" in problem["detail"]
    assert upstream.seen == []
    assert _failures(api, "enforce") == before + 1


@pytest.mark.parametrize(("method", "target", "headers", "body", "errors"), CASES)
def test_shadow(
    gateway: InProcessGateway,
    acme: Tenant,
    upstream: Recorder,
    bob_app: Consumer,
    key: str,
    caplog: pytest.LogCaptureFixture,
    version: str,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    errors: list[dict[str, str]],
) -> None:
    api = _publish(acme, upstream, bob_app, "shadow", version)
    before = _failures(api, "shadow")

    with caplog.at_level(logging.INFO, logger=request_validation.__name__):
        response = gateway.request(method, "/zoo" + target, headers={"X-API-Key": key, **headers}, body=body)

    assert response.status == 200, response.body
    assert len(upstream.seen) == 1 and upstream.seen[0].body == body
    logged = [r for r in caplog.records if r.name == request_validation.__name__]
    if not errors:
        assert _failures(api, "shadow") == before and logged == []
        return
    assert _failures(api, "shadow") == before + 1
    assert len(logged) == 1 and logged[0].api_id == api.pk  # type: ignore[attr-defined]
    assert _matches(logged[0].errors, errors)  # type: ignore[attr-defined]


def test_validation_comes_after_authentication(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder, bob_app: Consumer
) -> None:
    """An anonymous caller gets 401 for a bad body: the gateway neither reads nor judges it for them."""
    _publish(acme, upstream, bob_app, "enforce", "3.1.0")
    response = gateway.request("POST", "/zoo/pets", headers=JSON, body=b'{"age": "x"}')
    assert response.status == 401


def test_a_json_body_too_large_to_validate_is_413_in_enforce_and_passes_in_shadow(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder, bob_app: Consumer, key: str
) -> None:
    api = _publish(acme, upstream, bob_app, "enforce", "3.1.0")
    big = json.dumps({"name": "Rex", "toys": [{"name": "x" * 10}] * 80_000}).encode()
    assert len(big) > request_validation.MAX_VALIDATED_BODY
    headers = {"X-API-Key": key, **JSON}
    refused = gateway.request("POST", "/zoo/pets", headers=headers, body=big)
    assert refused.status == 413 and "at most 1048576 bytes" in refused.json()["detail"]
    chunked = gateway.request("POST", "/zoo/pets", headers=headers, body=b'{"name": "Rex"}', chunked=True)
    assert chunked.status == 413
    assert upstream.seen == []
    services.api_update(api=api, actor=None, validation="shadow")
    assert InProcessGateway().request("POST", "/zoo/pets", headers=headers, body=big).status == 200
    assert upstream.seen[0].body == big


def test_a_body_over_the_gateways_own_cap_is_refused_unread(
    gateway: InProcessGateway,
    settings_gateway: Any,
    acme: Tenant,
    upstream: Recorder,
    bob_app: Consumer,
    key: str,
) -> None:
    settings_gateway(MAX_BODY_BYTES=100)
    _publish(acme, upstream, bob_app, "enforce", "3.1.0")
    body = json.dumps({"name": "Rex", "toys": [{"name": "ball"}] * 20}).encode()
    refused = InProcessGateway().request("POST", "/zoo/pets", headers={"X-API-Key": key, **JSON}, body=body)
    assert refused.status == 413 and "at most 100 bytes" in refused.json()["detail"]
    assert upstream.seen == []


def test_off_checks_nothing_and_a_change_of_mode_applies_to_the_next_route_table(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder, bob_app: Consumer, key: str
) -> None:
    api = _publish(acme, upstream, bob_app, "off", "3.1.0")
    bad = {"X-API-Key": key}
    assert gateway.request("GET", "/zoo/pets?limit=99", headers=bad).status == 200
    services.api_update(api=api, actor=None, validation="enforce")
    assert InProcessGateway().get("/zoo/pets?limit=99", headers=bad).status == 400  # a worker on the new configuration


def test_the_document_is_compiled_once_per_route_table_not_per_request(
    gateway: InProcessGateway,
    acme: Tenant,
    upstream: Recorder,
    bob_app: Consumer,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled: list[int] = []
    original = request_validation._Compiled.__init__

    def counting(self: Any, document: dict[str, Any]) -> None:
        compiled.append(1)
        original(self, document)

    monkeypatch.setattr(request_validation._Compiled, "__init__", counting)
    _publish(acme, upstream, bob_app, "enforce", "3.1.0")
    for limit in (1, 2, 99, 3, 100):
        gateway.request("GET", f"/zoo/pets?limit={limit}", headers={"X-API-Key": key})
    assert len(compiled) == 1
    assert [s.path for s in upstream.seen] == ["/svc/pets?limit=1", "/svc/pets?limit=2", "/svc/pets?limit=3"]


BODIES = [
    {"name": "Rex"},
    {"name": "Rex", "age": 3, "tag": None, "kind": {"lives": 9}, "toys": [{"name": "ball"}]},
    {"name": "Rex", "kind": "dog"},
    {"name": ""},
    {"name": "Rex", "age": 1.0},
    {"name": "Rex", "age": 1.5},
    {"name": "Rex", "age": True},
    {"name": "x" * 21},
    {"name": "Rex", "kind": {"lives": "nine"}},
    {"name": "Rex", "kind": {"lives": 9, "extra": 1}},
    {"name": "Rex", "toys": [{}]},
    {"name": "Rex", "tag": 5},
    {"age": 2},
    [],
    "Rex",
    None,
]


@pytest.mark.parametrize("body", BODIES)
def test_the_fast_check_of_31_bodies_never_lets_through_what_the_oas_validator_refuses(body: Any) -> None:
    compiled = request_validation._Compiled(pets_spec("3.1.0"))
    operation = compiled.operations[("/pets", "POST")]
    assert operation.body_fast is not None
    if operation.body_fast.is_valid(body):
        assert list(operation.body_validator.iter_errors(body)) == []


def test_the_fast_check_is_used_only_where_it_means_the_same() -> None:
    # 3.0 bodies get theirs from a translation (tests/gateway/test_request_validation_30.py).
    assert request_validation._Compiled(pets_spec("3.0.3")).operations[("/pets", "POST")].body_fast is not None
    spec = pets_spec("3.1.0")
    spec["components"]["schemas"]["Named"]["properties"]["id"] = {"type": "integer", "format": "int32"}
    assert request_validation._Compiled(spec).operations[("/pets", "POST")].body_fast is None
    spec["components"]["schemas"]["Named"]["properties"]["id"] = {"type": "string", "format": "uuid"}
    assert request_validation._Compiled(spec).operations[("/pets", "POST")].body_fast is not None
    spec["components"]["schemas"]["Pet"]["discriminator"] = {"propertyName": "kind"}
    assert request_validation._Compiled(spec).operations[("/pets", "POST")].body_fast is None
