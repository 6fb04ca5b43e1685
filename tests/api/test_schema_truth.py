"""Answers are what the schema says they are: null only where declared, an OpenAPI field that is never null, and
bodies too deep to parse refused with a 400 on every endpoint rather than a 500."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from rest_framework import serializers

from apimgmt import services
from apimgmt.api import serializers as api_serializers
from apimgmt.api.parsers import MAX_BODY_DEPTH
from apimgmt.models import Api, Tenant

pytestmark = pytest.mark.django_db


def _schema(client: Any) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/mgmt/schema/?format=json").json()
    return document


# ---------------------------------------------------------------------------
# Nullability
# ---------------------------------------------------------------------------


def _column_is_nullable(model: type[models.Model], source: str) -> bool | None:
    """Whether the value at ``source`` (``owner``, ``consumer.tenant_id``) can be null; None if not a column."""
    nullable = False
    for part in source.split("."):
        try:
            field = model._meta.get_field(part)
        except FieldDoesNotExist:
            # attname of a foreign key (rotated_from_id) or a property: look the relation up by its attname.
            matches = [f for f in model._meta.concrete_fields if f.attname == part]
            if not matches:
                return None
            field = matches[0]
        if not isinstance(field, models.Field) or not field.concrete or field.many_to_many:
            return None
        nullable = nullable or field.null
        if field.is_relation and field.related_model is not None and part != source.split(".")[-1]:
            model = field.related_model  # type: ignore[assignment]
    return nullable


def _model_serializers() -> list[type[serializers.ModelSerializer]]:
    return [
        cls
        for _name, cls in inspect.getmembers(api_serializers, inspect.isclass)
        if issubclass(cls, serializers.ModelSerializer) and getattr(getattr(cls, "Meta", None), "model", None)
    ]


def test_every_field_over_a_nullable_column_is_declared_nullable() -> None:
    """Consumer.owner was declared a string but answered null: no serializer field may hide a nullable column."""
    checked = 0
    for serializer_class in _model_serializers():
        model = serializer_class.Meta.model
        for name, field in serializer_class().fields.items():
            if isinstance(field, api_serializers.OpenApiDocumentField):
                continue  # answers {} for "no document": never null, by design (and checked below)
            nullable = _column_is_nullable(model, str(field.source))
            if nullable is None:
                continue
            checked += 1
            assert field.allow_null == nullable, f"{serializer_class.__name__}.{name}: column null={nullable}"
    assert checked > 40  # every resource's serializer was looked at, not none


def _null_fields_are_declared(body: dict[str, Any], component: dict[str, Any]) -> None:
    for name, value in body.items():
        if value is None:
            assert component["properties"][name].get("nullable") is True, f"{name} is null but not nullable"


def test_answers_with_null_fields_match_their_schema(alice: User, acme: Tenant, acme_api: Api, client_for: Any) -> None:
    """A consumer made by an admin has no owner; a pending subscription has no decider: each answer says null where
    the schema allows it (GET, POST, PATCH, block, unblock, subscribe)."""
    c = client_for(alice)
    components = _schema(c)["components"]["schemas"]
    consumer = c.post("/mgmt/v1/consumers/", {"tenant_id": "acme", "name": "billing"}, format="json")
    assert consumer.status_code == 201 and consumer.json()["owner"] is None
    cid = consumer.json()["id"]
    answers = [
        consumer.json(),
        c.get(f"/mgmt/v1/consumers/{cid}/").json(),
        c.patch(f"/mgmt/v1/consumers/{cid}/", {"description": "Billing"}, format="json").json(),
        c.post(f"/mgmt/v1/consumers/{cid}/block/").json(),
        c.post(f"/mgmt/v1/consumers/{cid}/unblock/").json(),
        *c.get("/mgmt/v1/consumers/").json()["results"],
    ]
    for body in answers:
        assert body["owner"] is None
        _null_fields_are_declared(body, components["Consumer"])
    services.api_update(api=acme_api, subscription_approval="manual", actor=None)
    subscription = c.post("/mgmt/v1/subscriptions/", {"consumer_id": cid, "api_id": acme_api.pk}, format="json")
    assert subscription.status_code == 201, subscription.json()
    assert subscription.json()["decided_by"] is None and subscription.json()["status"] == "pending"
    _null_fields_are_declared(subscription.json(), components["Subscription"])


# ---------------------------------------------------------------------------
# The OpenAPI field
# ---------------------------------------------------------------------------


def test_a_new_api_has_an_empty_openapi_document_not_null(alice: User, acme: Tenant, client_for: Any) -> None:
    c = client_for(alice)
    body = {"tenant_id": "acme", "api_name": "orders", "base_path": "/orders", "upstream_url": "https://o.example.com"}
    created = c.post("/mgmt/v1/apis/", body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["openapi_spec"] == {}
    api_id = created.json()["id"]
    assert c.get(f"/mgmt/v1/apis/{api_id}/").json()["openapi_spec"] == {}
    field = _schema(c)["components"]["schemas"]["Api"]["properties"]["openapi_spec"]
    assert field["type"] == "object" and not field.get("nullable")

    document = {"openapi": "3.0.3", "info": {"title": "Orders", "version": "1"}, "paths": {}}
    assert c.patch(f"/mgmt/v1/apis/{api_id}/", {"openapi_spec": document}, format="json").json()["openapi_spec"] == (
        document
    )
    # {} removes the document: stored as "none" (the portal then offers no docs page), answered as {}.
    assert c.patch(f"/mgmt/v1/apis/{api_id}/", {"openapi_spec": {}}, format="json").json()["openapi_spec"] == {}
    assert Api.objects.get(pk=api_id).openapi_spec is None


# ---------------------------------------------------------------------------
# Deep JSON
# ---------------------------------------------------------------------------

DEEP_ENDPOINTS = [
    ("post", "/mgmt/v1/tenants/"),
    ("post", "/mgmt/v1/apis/"),
    ("post", "/mgmt/v1/consumers/"),
    ("post", "/mgmt/v1/keys/"),
    ("post", "/mgmt/v1/plans/"),
    ("post", "/mgmt/v1/policies/"),
    ("post", "/mgmt/v1/subscriptions/"),
    ("patch", "/mgmt/v1/consumers/{consumer}/"),
    ("put", "/mgmt/v1/consumers/{consumer}/"),
    ("post", "/mgmt/v1/consumers/{consumer}/block/"),
]


def _nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1000, 100_000, MAX_BODY_DEPTH + 1])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_body_nested_too_deep_is_a_400_problem_on_every_endpoint(
    depth: int, kind: str, staff: User, acme: Tenant, client_for: Any
) -> None:
    """1000 levels raised RecursionError inside the JSON parser (an HTML 500); any depth over the limit is a 400."""
    consumer = services.consumer_create(tenant=acme, name="deep", actor=None)
    c = client_for(staff)
    for method, path in DEEP_ENDPOINTS:
        r = getattr(c, method)(path.format(consumer=consumer.pk), _nested(depth, kind), content_type="application/json")
        assert r.status_code == 400, (method, path, r.status_code)
        assert r["Content-Type"] == "application/problem+json"
        assert r.json()["detail"] == f"The JSON body is nested deeper than {MAX_BODY_DEPTH} levels; flatten it."


def test_a_body_at_the_depth_limit_is_parsed_and_judged_by_its_fields(staff: User, client_for: Any) -> None:
    r = client_for(staff).post(
        "/mgmt/v1/consumers/", _nested(MAX_BODY_DEPTH, "object"), content_type="application/json"
    )
    assert r.status_code == 400
    assert r.json()["errors"]["a"] == ["Unknown field."]
