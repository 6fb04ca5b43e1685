"""The OpenAPI documents the request-validation tests check requests against, and the API that serves one.

One copy of each document, so the gateway tests (tests/gateway/test_request_validation.py) and the differential
tests of the compiled checks (tests/gateway/test_request_validation_30.py) judge the same schemas.
"""

from __future__ import annotations

from typing import Any

import pytest

from apimgmt.models import Api, Consumer, Tenant
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import Recorder

# Both OpenAPI versions validation follows: 3.0 Schema Objects (nullable, draft 4 bounds) and 3.1's JSON Schema.
VERSIONS = ["3.0.3", "3.1.0"]


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pets_spec(version: str) -> dict[str, Any]:
    """A small document with what validation must follow: $refs to components (schemas and parameters), allOf and
    oneOf, path-level parameters, two templates in one segment, arrays in the query, a required header."""
    nullable: dict[str, Any] = (
        {"type": ["string", "null"]} if version.startswith("3.1") else {"type": "string", "nullable": True}
    )
    return {
        "openapi": version,
        "info": {"title": "Pets", "version": "1"},
        "components": {
            "schemas": {
                "Named": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 20}},
                },
                "Pet": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Named"},
                        {
                            "type": "object",
                            "properties": {
                                "age": {"type": "integer", "minimum": 0},
                                "tag": nullable,
                                "kind": {"oneOf": [{"$ref": "#/components/schemas/Cat"}, {"type": "string"}]},
                                "toys": {"type": "array", "items": {"$ref": "#/components/schemas/Named"}},
                            },
                        },
                    ]
                },
                "Cat": {"type": "object", "required": ["lives"], "properties": {"lives": {"type": "integer"}}},
            },
            "parameters": {
                "Limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10}}
            },
        },
        "paths": {
            "/pets": {
                "get": {
                    "parameters": [
                        {"$ref": "#/components/parameters/Limit"},
                        {"name": "tags", "in": "query", "schema": {"type": "array", "items": {"enum": ["a", "b"]}}},
                        {"name": "sorted", "in": "query", "schema": {"type": "boolean"}},
                    ],
                    "responses": {"200": {"description": "Pets."}},
                },
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pet"}}},
                    },
                    "responses": {"201": {"description": "Made."}},
                },
            },
            "/pets/{petId}": {
                "parameters": [{"name": "petId", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "get": {
                    "parameters": [
                        {
                            "name": "X-Client-Version",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
                        }
                    ],
                    "responses": {"200": {"description": "A pet."}},
                },
                "patch": {
                    "requestBody": {
                        "content": {
                            "application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/Pet"}},
                            "text/plain": {"schema": {"type": "string"}},
                        }
                    },
                    "responses": {"200": {"description": "Changed."}},
                },
            },
            "/files/{name}.{ext}": {
                "get": {
                    "parameters": [
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 8}},
                        {"name": "ext", "in": "path", "required": True, "schema": {"enum": ["json", "csv"]}},
                    ],
                    "responses": {"200": {"description": "A file."}},
                }
            },
        },
    }


def one_operation_document(
    schema: dict[str, Any], components: dict[str, Any] | None = None, *, version: str = "3.0.3"
) -> dict[str, Any]:
    """A document with one operation, POST /t, whose JSON body must match ``schema``."""
    body = {"content": {"application/json": {"schema": schema}}}
    return {
        "openapi": version,
        "info": {"title": "T", "version": "1"},
        "paths": {"/t": {"post": {"requestBody": body, "responses": {"200": {"description": "ok"}}}}},
        "components": {"schemas": components or {}},
    }


def publish_validated(
    tenant: Tenant, upstream: Recorder, consumer: Consumer, document: dict[str, Any], *, base_path: str, validation: str
) -> Api:
    """An API checking requests against ``document`` in ``validation`` mode before ``upstream``'s /svc, with
    ``consumer`` subscribed."""
    api = publish(tenant, upstream.url + "/svc", base_path=base_path, openapi_spec=document, validation=validation)
    subscribe(consumer, api)
    return api
