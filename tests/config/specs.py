"""OpenAPI documents shaped like real ones, made to measure: hundreds of operations, $refs, allOf/oneOf, recursive
schemas, path parameters sharing a prefix, several servers, mixed security schemes."""

from __future__ import annotations

from typing import Any

RESOURCES = 60  # five operations each: 300


def _json(schema_ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


def large_spec(version: str = "3.0.3", *, resources: int = RESOURCES) -> dict[str, Any]:
    nullable_name: dict[str, Any] = (
        {"type": ["string", "null"]} if version.startswith("3.1") else {"type": "string", "nullable": True}
    )
    paths: dict[str, Any] = {}
    for i in range(resources):
        base = f"/res{i}"
        paths[base] = {
            "get": {
                "operationId": f"list{i}",
                "parameters": [{"$ref": "#/components/parameters/Limit"}],
                "responses": {"200": {"description": "ok", "content": _json("PetList")}},
            },
            "post": {
                "operationId": f"create{i}",
                "requestBody": {"required": True, "content": _json("Pet")},
                "responses": {"201": {"description": "created", "content": _json("Pet")}},
            },
        }
        # Same prefix: a literal segment beside a parameter, and a deeper path under the parameter.
        paths[f"{base}/mine"] = {"get": {"operationId": f"mine{i}", "responses": {"200": {"description": "ok"}}}}
        paths[f"{base}/{{petId}}"] = {
            "parameters": [{"$ref": "#/components/parameters/PetId"}],
            "get": {
                "operationId": f"get{i}",
                "responses": {
                    "200": {"description": "ok", "content": _json("Pet")},
                    "404": {"$ref": "#/components/responses/NotFound"},
                },
            },
        }
        paths[f"{base}/{{petId}}/photos"] = {
            "parameters": [{"$ref": "#/components/parameters/PetId"}],
            "put": {
                "operationId": f"photos{i}",
                "requestBody": {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"204": {"description": "stored"}},
            },
        }
    return {
        "openapi": version,
        "info": {"title": "Pet Store", "version": "2.4.0", "description": "Pets, cats and dogs."},
        "servers": [
            {
                "url": "https://{region}.pets.example.com/v2",
                "variables": {"region": {"default": "eu", "enum": ["eu", "us"]}},
            },
            {"url": "https://sandbox.pets.example.com/v2"},
        ],
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": {
                "Base": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}},
                "Cat": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Base"},
                        {"type": "object", "properties": {"lives": {"type": "integer"}}},
                    ]
                },
                "Dog": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Base"},
                        {"type": "object", "properties": {"good": {"type": "boolean"}}},
                    ]
                },
                "Pet": {
                    "oneOf": [{"$ref": "#/components/schemas/Cat"}, {"$ref": "#/components/schemas/Dog"}],
                    "discriminator": {"propertyName": "kind"},
                },
                "PetList": {"type": "array", "items": {"$ref": "#/components/schemas/Pet"}},
                "Node": {  # recursive
                    "type": "object",
                    "properties": {
                        "name": nullable_name,
                        "children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                    },
                },
                "Error": {"type": "object", "properties": {"detail": {"type": "string"}}},
            },
            "parameters": {
                "PetId": {"name": "petId", "in": "path", "required": True, "schema": {"type": "integer"}},
                "Limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}},
            },
            "responses": {"NotFound": {"description": "no such pet", "content": _json("Error")}},
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Pets-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "oauth": {
                    "type": "oauth2",
                    "flows": {"clientCredentials": {"tokenUrl": "https://auth.example.com/token", "scopes": {}}},
                },
            },
        },
    }
