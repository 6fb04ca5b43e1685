"""The compiled check of OpenAPI 3.0 request bodies (3.0 Schema Objects translated for jsonschema-rs): it may only
say "valid" where openapi-schema-validator says so too. A differential test over generated bodies (nulls, wrong
types, boundaries, extra properties, formats, nested arrays and objects, allOf/oneOf/anyOf/not, read-only
properties), a keyword table, the schemas left without a compiled check, and numbers jsonschema-rs cannot hold."""
# ruff: noqa: F811  (the version fixture of tests/gateway/openapi_documents.py is imported by name)

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from apimgmt.models import Consumer, Tenant
from gateway import request_validation
from tests.gateway.conftest import InProcessGateway
from tests.gateway.openapi_documents import (  # noqa: F401 (a fixture)
    VERSIONS,
    one_operation_document,
    pets_spec,
    publish_validated,
    version,
)
from tests.gateway.upstreams import Recorder

S = "#/components/schemas/"


def orders_spec() -> dict[str, Any]:
    """A 3.0 document with what real ones hold: $refs (one with siblings, one recursive), allOf/oneOf/anyOf/not,
    nullable, draft 4 exclusive bounds, formats, patterns, read-only properties, a discriminator without a
    combinator, examples and xml."""
    schemas: dict[str, Any] = {
        "Money": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 100000, "format": "double"},
        "Sku": {"type": "string", "pattern": "^[A-Z0-9-]{3,20}$"},
        "Item": {
            "type": "object",
            "required": ["sku", "qty"],
            "additionalProperties": False,
            "properties": {
                "sku": {"$ref": S + "Sku"},
                "qty": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 1000, "exclusiveMaximum": True},
                "price": {"$ref": S + "Money"},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["red", "blue", "big"]},
                    "uniqueItems": True,
                    "maxItems": 3,
                },
                "pack": {"type": "integer", "multipleOf": 6, "nullable": True},
                "note": {"type": "string", "nullable": True, "maxLength": 10, "example": "x", "xml": {"name": "n"}},
            },
        },
        "Customer": {
            "type": "object",
            "required": ["id", "email", "created"],
            "discriminator": {"propertyName": "kind"},
            "additionalProperties": {"type": "string"},
            "properties": {
                "id": {"type": "integer", "format": "int64", "readOnly": True},
                "email": {"type": "string", "format": "email"},
                "created": {"type": "string", "format": "date-time", "readOnly": True},
                "born": {"type": "string", "format": "date"},
                "ref": {"type": "string", "format": "uuid"},
                "ip": {"type": "string", "format": "ipv4"},
                "avatar": {"type": "string", "format": "byte"},
                "kind": {"type": "string", "enum": ["person", "company"]},
                "address": {"$ref": S + "Address", "nullable": True},  # nullable without a type: no effect
                "secret": {"type": "string", "writeOnly": True},
            },
        },
        "Address": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 2,
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "minLength": 5, "maxLength": 5}},
        },
        "Payment": {
            "oneOf": [{"$ref": S + "Card"}, {"$ref": S + "Transfer"}],
            "discriminator": {"propertyName": "method", "mapping": {"card": S + "Card"}},
        },
        "Refund": {"oneOf": [{"$ref": S + "Card"}, {"$ref": S + "Transfer"}]},
        "Card": {
            "type": "object",
            "required": ["number"],
            "properties": {
                "number": {"type": "string", "pattern": "^[0-9]{16}$"},
                "cvc": {"type": "integer", "minimum": 100, "maximum": 999},
            },
        },
        "Transfer": {
            "type": "object",
            "required": ["iban"],
            "properties": {"iban": {"type": "string", "minLength": 15}},
        },
        "Tree": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": S + "Tree"}}},
        },
        "Base": {"type": "object", "properties": {"tree": {"$ref": S + "Tree"}, "lines": {"type": "string"}}},
        "Order": {
            "allOf": [
                {"$ref": S + "Base"},
                {
                    "type": "object",
                    "required": ["customer", "items"],
                    "properties": {
                        "customer": {"$ref": S + "Customer"},
                        "items": {"type": "array", "minItems": 1, "items": {"$ref": S + "Item"}},
                        "payment": {"$ref": S + "Payment"},
                        "refund": {"$ref": S + "Refund"},
                        "priority": {
                            "anyOf": [
                                {"type": "integer", "minimum": 1, "maximum": 5},
                                {"type": "string", "enum": ["low", "high"]},
                            ]
                        },
                        "grid": {
                            "type": "array",
                            "items": {"type": "array", "maxItems": 2, "items": {"type": "number", "nullable": True}},
                        },
                        "flags": {"not": {"type": "string"}},
                        "coupon": {"type": "string", "nullable": True, "enum": ["A10", "B20", None]},
                        "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "code": {"$ref": S + "Sku", "maxLength": 5},  # a $ref's siblings count in 3.0
                        "version": {"type": "integer", "minimum": -5, "exclusiveMinimum": False},
                        "later": {"type": "string", "const": "x", "contains": {}},  # unknown to 3.0: ignored
                    },
                },
            ]
        },
    }
    body = {"required": True, "content": {"application/json": {"schema": {"$ref": S + "Order"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Orders", "version": "1"},
        "paths": {"/orders": {"post": {"requestBody": body, "responses": {"201": {"description": "Made."}}}}},
        "components": {"schemas": schemas},
    }


BASE: dict[str, Any] = {
    "customer": {
        "email": "ann@example.com",
        "born": "1990-02-28",
        "ref": "0b3d9b0e-7c1c-4b8a-9d0e-4f1a2b3c4d5e",
        "ip": "10.0.0.1",
        "avatar": "aGVsbG8=",
        "kind": "person",
        "address": {"street": "1 Long Street", "zip": "12345"},
        "secret": "s",
        "nickname": "annie",
    },
    "items": [
        {"sku": "SKU-1", "qty": 2, "price": 9.99, "tags": ["red", "big"], "pack": 12, "note": None},
        {"sku": "SKU-2", "qty": 999},
    ],
    "payment": {"method": "card", "number": "1234567812345678", "cvc": 123},
    "refund": {"iban": "DE89370400440532013000"},
    "priority": 3,
    "grid": [[1, None], [2.5]],
    "flags": 7,
    "coupon": None,
    "meta": {"a": 1},
    "code": "AB1",
    "version": -5,
    "later": "not x",
    "tree": {"label": "root", "children": [{"label": "leaf", "children": []}]},
    "lines": "one",
}

VALUES: list[Any] = [
    None, True, False, 0, 1, -1, -5, -6, 3, 5, 6, 7, 12, 100, 999, 1000, 1.0, 1.5, -0.0, 1e-9, 100000, 100000.5,
    2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, 10**30, 12.0,
    "", "A", "ABC", "ABC\n", "abc", "AB123", "ABCDEF", "x" * 11, "12345", "1234", "2024-02-29", "2023-02-29",
    "2024-01-01T10:00:00Z", "2024-01-01 10:00", "ann@example.com", "ann", "0b3d9b0e7c1c4b8a9d0e4f1a2b3c4d5e",
    "10.0.0.256", "::1", "aGVsbG8", "not base64!", "é", "red", "low", "A10", "company", "x",
    [], [1], [1, 1.0], ["red", "red"], ["red", "blue", "big", "red"], [[1, None]], [[1, 2, 3]], [None], ["low"],
    {}, {"a": 1}, {"a": 1.0}, {"a": "1"}, {"number": "1234567812345678"}, {"iban": "DE89370400440532013000"},
    {"number": "1234567812345678", "iban": "DE89370400440532013000"}, {"street": "x"},
    {"street": "x", "zip": "12345", "more": "y"}, {"label": "x", "children": [{"label": 5}]},
    {"sku": "ABC", "qty": 1}, {"sku": "ABC", "qty": 1, "extra": 1},
    {"method": "Transfer", "iban": "DE89370400440532013000"}, {"method": "card"}, {"method": "Card", "cvc": 5},
    {"method": "Card", "number": "1234567812345678"}, {"method": "Address", "street": "x"}, {"method": ""},
    {"method": "Transfer", "number": "1234567812345678"}, {"method": ["card"]}, "card", "Transfer",
]  # fmt: skip


def _places(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _places(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _places(item, (*at, index))


def _with(body: Any, at: tuple[Any, ...], value: Any, *, delete: bool = False) -> Any:
    changed = copy.deepcopy(body)
    if not at:
        return copy.deepcopy(value)
    parent = changed
    for part in at[:-1]:
        parent = parent[part]
    if delete:
        del parent[at[-1]]
    else:
        parent[at[-1]] = copy.deepcopy(value)
    return changed


def generated_bodies(seed: int = 30) -> Iterator[Any]:
    """The base body, each place of it replaced by each of VALUES or removed, an extra property in each object,
    and random pairs of changes."""
    yield BASE
    places = list(_places(BASE))
    for at in places:
        for value in VALUES:
            yield _with(BASE, at, value)
        if at:
            yield _with(BASE, at, None, delete=True)
        target = _with(BASE, (), BASE)
        for part in at:
            target = target[part]
        if isinstance(target, dict):
            yield _with(BASE, (*at, "extra"), "x")
    rng = random.Random(seed)
    for _ in range(1500):
        body = _with(BASE, (), BASE)
        for _change in range(2):
            live = list(_places(body))
            body = _with(body, rng.choice(live), rng.choice(VALUES))
        yield body


def _compiled(document: dict[str, Any]) -> request_validation._Operation:
    compiled = request_validation._Compiled(document)
    return next(iter(compiled.operations.values()))


def _oas_valid(operation: request_validation._Operation, body: Any) -> bool:
    """openapi-schema-validator's verdict; one that raises (format byte of a non-ASCII string) counts as refusing
    here, which asks more of the fast check than the gateway does (there it checks nothing further)."""
    try:
        return not list(operation.body_validator.iter_errors(body))
    except Exception:
        return False


def test_the_fast_check_of_30_bodies_never_lets_through_what_the_oas_validator_refuses() -> None:
    operation = _compiled(orders_spec())
    assert operation.body_fast is not None
    agree = fast_valid = oas_valid = total = 0
    passed_wrongly: list[Any] = []
    for generated in generated_bodies():
        body = json.loads(json.dumps(generated))  # as the gateway reads it
        fast = request_validation._fast_valid(operation.body_fast, body)
        oas = _oas_valid(operation, body)
        total += 1
        fast_valid += fast
        oas_valid += oas
        agree += fast == oas
        if fast and not oas:
            passed_wrongly.append(body)
    assert passed_wrongly == [], f"{len(passed_wrongly)} bodies passed the fast check only; first: {passed_wrongly[0]}"
    # Not a vacuous proof: thousands of bodies, both verdicts well represented, and the fast check says "valid"
    # for (nearly) every body that is valid, so it is what answers them.
    assert total > 5000 and oas_valid > 500 and total - oas_valid > 3000, (total, oas_valid)
    assert fast_valid >= 0.99 * oas_valid, (fast_valid, oas_valid)
    assert agree >= 0.99 * total


DISCRIMINATED = {
    "oneOf": [{"$ref": S + "Cat"}, {"type": "string"}],
    "discriminator": {"propertyName": "k", "mapping": {"dog": S + "Dog"}},
}
# (schema, instance, what openapi-schema-validator says): the fast check must agree where it says valid.
KEYWORDS = [
    pytest.param({"type": "integer"}, 1.0, False, id="a-float-is-no-integer"),
    pytest.param({"type": "integer"}, True, False, id="a-boolean-is-no-integer"),
    pytest.param({"type": "integer", "nullable": True}, None, True, id="nullable"),
    pytest.param({"type": "integer", "nullable": False}, None, False, id="not-nullable"),
    pytest.param({"type": "integer"}, None, False, id="null-without-nullable"),
    pytest.param({"nullable": True, "enum": [1]}, None, False, id="nullable-needs-a-type"),
    pytest.param({"type": "string", "nullable": True, "enum": ["a"]}, None, False, id="nullable-enum-without-null"),
    pytest.param({"minimum": 5, "exclusiveMinimum": True}, 5, False, id="exclusive-minimum"),
    pytest.param({"minimum": 5, "exclusiveMinimum": True}, 5.000001, True, id="over-exclusive-minimum"),
    pytest.param({"maximum": 5, "exclusiveMaximum": True}, 5, False, id="exclusive-maximum"),
    pytest.param({"maximum": 5, "exclusiveMaximum": False}, 5, True, id="inclusive-maximum"),
    pytest.param({"exclusiveMaximum": True}, 10**9, True, id="exclusive-alone-means-nothing"),
    pytest.param({"maximum": 2**63 - 1}, 2**63, False, id="maximum-of-big-integers"),
    pytest.param({"type": "integer", "format": "int32"}, 2**31, False, id="int32-over"),
    pytest.param({"type": "integer", "format": "int32"}, -(2**31), True, id="int32-lowest"),
    pytest.param({"type": "number", "format": "int32"}, 3e10, True, id="int32-ignores-floats"),
    pytest.param({"format": "int64"}, 2**63, False, id="int64-over"),
    pytest.param({"format": "int64"}, -(2**63), True, id="int64-lowest"),
    pytest.param({"type": "number", "format": "float"}, 10**40, True, id="float-format-checks-nothing"),
    pytest.param({"type": "string", "format": "date"}, "2023-02-29", False, id="date"),
    pytest.param({"type": "string", "format": "date-time"}, "2023-02-28T10:00:00Z", True, id="date-time"),
    pytest.param({"type": "string", "format": "uuid"}, "0b3d9b0e7c1c4b8a9d0e4f1a2b3c4d5e", False, id="uuid-no-dashes"),
    pytest.param({"type": "string", "format": "byte"}, "aGVsbG8", False, id="byte-unpadded"),
    pytest.param({"type": "string", "format": "byte"}, "aGVsbG8=", True, id="byte"),
    pytest.param({"type": "string", "format": "uri"}, "not a uri", True, id="format-the-oas-validator-does-not-know"),
    pytest.param({"type": "string", "format": "email"}, 5, False, id="format-of-another-type"),
    pytest.param({"format": "email"}, 5, True, id="format-only-for-strings"),
    pytest.param({"type": "string", "pattern": "^[a-z]+$"}, "abc\n", True, id="pattern-dollar-before-newline"),
    pytest.param({"type": "string", "pattern": "^\\d+$"}, "١٢٣", True, id="pattern-unicode-digits"),
    pytest.param({"type": "string", "pattern": "^\\s*$"}, "\ufeff", False, id="pattern-bom-is-no-space"),
    pytest.param({"pattern": "b"}, "abc", True, id="pattern-searches"),
    pytest.param({"multipleOf": 3}, 9.0, True, id="multiple-of-a-float-value"),
    pytest.param({"multipleOf": 3}, 2**64, False, id="multiple-of-big"),
    pytest.param({"multipleOf": 2}, 2**64 + 2, True, id="multiple-of-big-even"),
    pytest.param({"uniqueItems": True}, [1, 1.0], False, id="unique-one-and-one-point-zero"),
    pytest.param({"uniqueItems": True}, [1, True], True, id="unique-one-and-true"),
    pytest.param({"uniqueItems": True}, [{"a": 1}, {"a": 1.0}], False, id="unique-objects"),
    pytest.param({"enum": [1]}, 1.0, True, id="enum-one-point-zero"),
    pytest.param({"enum": [1]}, True, False, id="enum-true-is-not-one"),
    pytest.param({"enum": [[1]]}, [True], False, id="enum-nested-true"),
    pytest.param({"readOnly": True}, "x", False, id="read-only-value"),
    pytest.param({"writeOnly": True}, "x", True, id="write-only-value"),
    pytest.param(
        {"required": ["id"], "properties": {"id": {"type": "integer", "readOnly": True}}},
        {},
        True,
        id="read-only-not-required",
    ),
    pytest.param(
        {"required": ["id"], "properties": {"id": {"$ref": S + "Id"}}}, {}, False, id="read-only-behind-a-ref-required"
    ),
    pytest.param({"$ref": S + "Id", "maximum": 3}, 4, False, id="ref-siblings-count"),
    pytest.param({"$ref": S + "Id"}, 4, False, id="read-only-behind-a-ref"),
    pytest.param({"additionalProperties": False, "properties": {"a": {}}}, {"a": 1, "b": 2}, False, id="extra"),
    pytest.param(
        {"patternProperties": {"^x": {"type": "integer"}}}, {"xa": "s"}, True, id="pattern-properties-ignored"
    ),
    pytest.param({"const": 1, "contains": {}, "if": {"type": "string"}}, 2, True, id="later-keywords-ignored"),
    pytest.param({"discriminator": {"propertyName": "k"}, "type": "object"}, {}, True, id="discriminator-alone"),
    pytest.param({"maxLength": 2}, "éé", True, id="length-in-characters"),
    pytest.param(DISCRIMINATED, {"k": "Id"}, False, id="discriminator-needs-an-object"),
    pytest.param(DISCRIMINATED, {"k": "Cat", "lives": 9}, True, id="discriminator-implicit"),
    pytest.param(DISCRIMINATED, {"k": "Cat", "lives": "9"}, False, id="discriminator-implicit-refused"),
    pytest.param(DISCRIMINATED, {"k": "dog", "bark": True}, True, id="discriminator-mapping"),
    pytest.param(DISCRIMINATED, {"k": "dog", "bark": "loud"}, False, id="discriminator-mapping-refused"),
    pytest.param(DISCRIMINATED, {"k": "dog", "lives": "9"}, True, id="discriminator-list-not-asked"),
    pytest.param(DISCRIMINATED, {"k": "Dog", "bark": True}, True, id="discriminator-any-component"),
    pytest.param(DISCRIMINATED, {"lives": 9}, False, id="discriminator-missing"),
    pytest.param(DISCRIMINATED, {"k": "", "lives": 9}, False, id="discriminator-empty"),
    pytest.param(DISCRIMINATED, {"k": "Fish", "lives": 9}, False, id="discriminator-names-nothing"),
    pytest.param({"items": {"type": "array", "items": {"type": "integer"}}}, [[1], [1.5]], False, id="nested-arrays"),
    pytest.param({"allOf": [{"minimum": 1}, {"maximum": 3}]}, 4, False, id="allOf"),
    pytest.param({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 1.5, False, id="anyOf"),
    pytest.param({"oneOf": [{"type": "number"}, {"type": "integer"}]}, 1, False, id="oneOf-both"),
    pytest.param({"not": {"type": "number"}}, 1, False, id="not"),
]


# Valid, but not said so by the fast check: a float value of an integer multipleOf (Python's float arithmetic), a
# discriminator value naming a component neither the mapping nor the list gives.
FAST_CHECK_REFUSES = [({"multipleOf": 3}, 9.0), (DISCRIMINATED, {"k": "Dog", "bark": True})]


@pytest.mark.parametrize(("schema", "instance", "valid"), KEYWORDS)
def test_the_fast_check_agrees_keyword_by_keyword(schema: dict[str, Any], instance: Any, valid: bool) -> None:
    components = {
        "Id": {"type": "integer", "readOnly": True, "minimum": 3},
        "Cat": {"type": "object", "required": ["lives"], "properties": {"lives": {"type": "integer"}}},
        "Dog": {"type": "object", "properties": {"bark": {"type": "boolean"}}},
    }
    operation = _compiled(one_operation_document(schema, components))
    assert _oas_valid(operation, instance) is valid  # what openapi-schema-validator says, checked as it is
    assert operation.body_fast is not None
    fast = request_validation._fast_valid(operation.body_fast, instance)
    if (schema, instance) in FAST_CHECK_REFUSES:
        assert fast is False  # left to openapi-schema-validator, which decides
        return
    assert fast is valid


NOT_TRANSLATED = [
    pytest.param({"oneOf": [{"type": "object"}], "discriminator": "k"}, id="discriminator-not-an-object"),
    pytest.param(
        {"patternProperties": {"^x": {}}, "additionalProperties": False}, id="patternProperties-with-additional"
    ),
    pytest.param({"multipleOf": 0.1}, id="float-multipleOf"),
    pytest.param({"type": "null"}, id="type-null"),
    pytest.param({"type": ["string", "null"]}, id="type-list"),
    pytest.param({"$ref": "other.yaml#/Pet"}, id="ref-outside-the-document"),
    pytest.param({"$ref": S + "Missing"}, id="ref-to-nothing"),
    pytest.param({"pattern": "(?P<x>a)(?P=x)\\Z["}, id="pattern-python-refuses"),
    pytest.param({"properties": {"a": {"$schema": "http://json-schema.org/draft-07/schema#"}}}, id="$schema"),
    pytest.param({"minimum": 1, "exclusiveMinimum": 1}, id="exclusive-minimum-a-number"),
    pytest.param({"items": [{"type": "string"}]}, id="items-a-list"),
]


@pytest.mark.parametrize("schema", NOT_TRANSLATED)
def test_schemas_that_cannot_be_translated_exactly_have_no_fast_check(schema: dict[str, Any]) -> None:
    operation = _compiled(one_operation_document(schema))
    assert operation.body_validator is not None
    assert operation.body_fast is None


def test_recursive_schemas_and_many_operations_share_one_translation() -> None:
    document = orders_spec()
    path_item = document["paths"]["/orders"]
    for i in range(50):
        document["paths"][f"/orders{i}"] = path_item
    compiled = request_validation._Compiled(document)
    checks = {id(op.body_fast) for op in compiled.operations.values()}
    assert len(checks) == 1 and None not in checks


@pytest.fixture
def numbers_api(acme: Tenant, upstream: Recorder, bob_app: Consumer, version: str) -> str:
    schema = {"type": "object", "properties": {"n": {"maximum": 0}, "s": {"type": "string"}}}
    document = one_operation_document(schema, version=version)
    publish_validated(acme, upstream, bob_app, document, base_path="/nums", validation="enforce")
    return "/nums/t"


@pytest.mark.django_db
@pytest.mark.parametrize("number", [b"Infinity", b"1e400", b"-1e999" + b"9" * 300, b"NaN"])
def test_numbers_jsonschema_rs_cannot_hold_are_judged_by_the_oas_validator(
    gateway: InProcessGateway, upstream: Recorder, key: str, numbers_api: str, number: bytes
) -> None:
    """Python reads these as infinite or NaN; jsonschema-rs would pass them where maximum 0 refuses infinity."""
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    response = gateway.request("POST", numbers_api, headers=headers, body=b'{"n": ' + number + b"}")
    if number == b"NaN":  # NaN is not greater than 0: both validators let it through
        assert response.status == 200, response.body
        return
    if number.startswith(b"-"):
        assert response.status == 200, response.body
        return
    assert response.status == 400, response.body
    assert response.json()["errors"][0]["pointer"] == "/n"
    assert upstream.seen == []


@pytest.mark.django_db
def test_a_string_jsonschema_rs_cannot_hold_is_judged_by_the_oas_validator(
    gateway: InProcessGateway, upstream: Recorder, key: str, numbers_api: str
) -> None:
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    ok = gateway.request("POST", numbers_api, headers=headers, body=b'{"s": "\\ud800"}')  # a lone surrogate
    assert ok.status == 200, ok.body
    refused = gateway.request("POST", numbers_api, headers=headers, body=b'{"s": "\\ud800", "n": 1}')
    assert refused.status == 400 and refused.json()["errors"][0]["pointer"] == "/n"


TEXTS = [
    "5", "0", "-1", "10", "11", "1.5", "1.0", "1e400", "-1e400", "five", "true", "false", "yes", "", "a", "b", "c",
    "a,b", "a,c", "2.1", "2.1.0", "x" * 8, "x" * 9, "json", "csv", "12", "99999999999999999999",
]  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
def test_the_fast_check_of_parameters_never_lets_through_what_the_oas_validator_refuses(version: str) -> None:
    compiled = request_validation._Compiled(pets_spec(version))
    params = [param for operation in compiled.operations.values() for param in operation.params]
    assert len(params) >= 6 and all(param.fast is not None for param in params)
    checked = 0
    for param in params:
        for first in TEXTS:
            for texts in ([first], [first, "a"], [first, first]):
                value = param.value(texts)
                oas = not list(param.validator.iter_errors(value))
                if request_validation._finite_numbers(value) and request_validation._fast_valid(param.fast, value):
                    assert oas, (param.name, value)
                    checked += 1
    assert checked > 50


@pytest.mark.django_db
def test_a_number_parameter_read_as_infinite_is_judged_by_the_oas_validator(
    gateway: InProcessGateway, acme: Tenant, upstream: Recorder, bob_app: Consumer, key: str
) -> None:
    document = one_operation_document({"type": "object"})
    schema = {"type": "number", "maximum": 10, "nullable": True}  # converted from text as a number
    parameter = {"name": "n", "in": "query", "schema": schema}
    document["paths"]["/t"]["get"] = {"parameters": [parameter], "responses": {"200": {"description": "ok"}}}
    publish_validated(acme, upstream, bob_app, document, base_path="/nums", validation="enforce")
    refused = gateway.request("GET", "/nums/t?n=1e400", headers={"X-API-Key": key})
    assert refused.status == 400 and refused.json()["errors"][0]["name"] == "n"
    assert gateway.request("GET", "/nums/t?n=1e4", headers={"X-API-Key": key}).status == 400
    assert gateway.request("GET", "/nums/t?n=9.5", headers={"X-API-Key": key}).status == 200
    assert [s.path for s in upstream.seen] == ["/svc/t?n=9.5"]
