"""The JSON Schema of a tenant's configuration document (published at /mgmt/v1/config/schema, docs/config.schema.json).

Built from the models' choices and the policy-config contract, so the schema cannot offer a value the services
refuse. The schema checks shape; the services still check meaning (routes, upstream addresses, references).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Model

from apimgmt import services, validation
from apimgmt.models import Api, Consumer, JwtIssuer, Plan, Policy
from apimgmt.policy_types import cors, headers, request_limits, response_cache

FORMAT = "apimgmt/config/v1"
# An API in the document: these first, in this order (what people look for), then every other field the API services
# accept (services.API_FIELDS, in their order), then what it refers to. A field added to the services is thereby
# exported, planned and applied, with its schema taken from the model field.
API_LEADING: tuple[str, ...] = ("name", "description", "status", "visibility", "subscription_approval")
API_LEADING += ("base_path", "host", "strip_path", "upstream_url", "targets")
API_TRAILING = ("policies", "plans", "jwt_issuers", "openapi_spec")
# Document field -> model field, where they differ.
API_MODEL_FIELD = {"name": "api_name"}
# A JWT issuer in the document, in this order (the services' fields).
JWT_ISSUER_FIELDS: tuple[str, ...] = services.JWT_ISSUER_FIELDS


def api_document_fields() -> tuple[str, ...]:
    placed = {API_MODEL_FIELD.get(name, name) for name in API_LEADING + API_TRAILING}
    middle = tuple(name for name in services.API_FIELDS if name not in placed)
    return API_LEADING + middle + API_TRAILING


def model_field_schema(model: type[Model], name: str) -> dict[str, Any]:
    """A model field as JSON Schema: type, bounds from its validators, choices, default and help text."""
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    schema: dict[str, Any]
    if isinstance(field, models.BooleanField):
        schema = {"type": "boolean"}
    elif isinstance(field, models.IntegerField):
        schema = {"type": "integer"}
        if isinstance(field, (models.PositiveIntegerField, models.PositiveSmallIntegerField)):
            schema["minimum"] = 0
    elif isinstance(field, models.FloatField):
        schema = {"type": "number"}
    elif isinstance(field, models.DateTimeField):
        schema = {"type": "string", "format": "date-time"}
    elif isinstance(field, models.JSONField):
        schema = {"type": "object"}
    else:
        schema = {"type": "string"}
        if field.max_length:
            schema["maxLength"] = field.max_length
    for validator in field.validators:
        if isinstance(validator, MinValueValidator):
            schema["minimum"] = validator.limit_value
        elif isinstance(validator, MaxValueValidator):
            schema["maximum"] = validator.limit_value
    if field.choices:
        choices = [(value, label) for value, label in field.flatchoices]
        schema = {"enum": [value for value, _label in choices]}
        if not field.help_text:
            schema["description"] = "; ".join(f"{value}: {label}" for value, label in choices) + "."
    if field.null:
        schema["type"] = [schema["type"], "null"] if "type" in schema else None
        if "enum" in schema:
            schema["enum"].append(None)
    if field.has_default() or field.null:
        default = field.get_default()
        schema["default"] = default if not isinstance(default, dict) else None
    if field.help_text:
        schema["description"] = str(field.help_text)
    return schema


SCHEMA_ID = "urn:apimgmt:config:v1"
NAME_MAX = 100


def _name(description: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": NAME_MAX, "description": description}


def _names(description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "uniqueItems": True,
        "description": description,
    }


def _choice(values: list[str], default: str, description: str) -> dict[str, Any]:
    return {"enum": values, "default": default, "description": description}


def _count(name: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": 10**12, "description": f"Allowed {name.replace('_', ' ')}."}


def _policy_config(windows: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    properties = {name: _count(name) for name in windows}
    properties["key_extraction"] = _choice(
        list(validation.KEY_EXTRACTIONS), "consumer_id", "Whose counter a request uses."
    )
    properties.update(extra)
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "anyOf": [{"required": [name]} for name in windows],
    }


def _strings(description: str, *, max_items: int = 100, min_items: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "maxItems": max_items,
        "description": description,
    }
    if min_items:
        schema["minItems"] = min_items
    return schema


def _integer(low: int, high: int, description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


def _flag(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def _object(
    properties: dict[str, Any], *, required: tuple[str, ...] = (), one_of_required: bool = False
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    if one_of_required:
        schema["anyOf"] = [{"required": [name]} for name in properties]
    return schema


def policy_config_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per policy type for its config: the shape only; apimgmt.validation decides the meaning (and
    normalises, filling in defaults), with errors that name the field."""
    rate_config = _policy_config(
        list(validation.RATE_WINDOWS),
        {
            "window_type": _choice(["sliding", "fixed"], "sliding", "Sliding (GCRA) or calendar-fixed windows."),
            "burst_size": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Extra requests a sliding window admits at once.",
            },
        },
    )
    header_values: dict[str, Any] = {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": headers.MAX_VALUE_LENGTH},
        "maxProperties": headers.MAX_PER_OPERATION,
        "description": "Header name to value; values may use {consumer_id}, {key_id}, {tenant_id}, {api_id}, "
        "{request_id}, {client_ip} and {jwt.<claim>} ({{ and }} for literal braces).",
    }
    header_operations = _object(
        {
            "add": {
                **header_values,
                "description": "Added, keeping values already there. " + header_values["description"],
            },
            "set": {
                **header_values,
                "description": "Set, replacing values already there. " + header_values["description"],
            },
            "remove": _strings("Header names removed.", max_items=headers.MAX_PER_OPERATION),
        }
    )
    schemas: dict[Policy.Type, dict[str, Any]] = {
        Policy.Type.RATE_LIMITING: rate_config,
        Policy.Type.QUOTA: _policy_config(list(validation.QUOTA_WINDOWS), {}),
        Policy.Type.CORS: _object(
            {
                "allow_origins": _strings(
                    'Exact origins ("https://app.example.com"), patterns ("https://*.example.com") or ["*"].',
                    min_items=1,
                ),
                "allow_methods": _strings(f"Default {', '.join(cors.DEFAULT_METHODS)}."),
                "allow_headers": _strings('Request headers a browser may send; "*" for any (not with credentials).'),
                "expose_headers": _strings("Response headers a browser script may read."),
                "allow_credentials": _flag('Cookies and credentials; refused with allow_origins ["*"]. Default false.'),
                "max_age": _integer(
                    0, cors.MAX_AGE_LIMIT, "Seconds a browser may cache a preflight answer. Default 600."
                ),
            },
            required=("allow_origins",),
        ),
        Policy.Type.IP_RULES: _object(
            {
                "allow": _strings("CIDRs allowed, e.g. 203.0.113.0/24 or 2001:db8::/32; no others when not empty."),
                "deny": _strings("CIDRs refused (deny wins)."),
            },
            one_of_required=True,
        ),
        Policy.Type.HEADERS: _object(
            {"request": header_operations, "response": header_operations}, one_of_required=True
        ),
        Policy.Type.REQUEST_LIMITS: _object(
            {
                "allowed_methods": _strings("Other methods get 405 with Allow."),
                "max_body_bytes": _integer(0, request_limits.MAX_BODY_BYTES, "A larger body gets 413."),
                "max_headers": _integer(1, request_limits.MAX_HEADERS, "More request headers get 431."),
                "max_header_bytes": _integer(1, request_limits.MAX_HEADER_BYTES, "Larger request headers get 431."),
            },
            one_of_required=True,
        ),
        Policy.Type.RESPONSE_CACHE: _object(
            {
                "ttl_seconds": _integer(1, response_cache.MAX_TTL, "The longest an entry lives. Default 300."),
                "max_entry_bytes": _integer(1, response_cache.MAX_ENTRY_BYTES, "Larger answers are not kept."),
                "per_consumer": _flag("Each consumer its own entries. Default false."),
                "count_hits_toward_quota": _flag("Default true."),
                "vary_headers": _strings("Request headers that are part of the cache key, beyond the upstream's Vary."),
            }
        ),
    }
    return {policy_type.value: schema for policy_type, schema in schemas.items()}


def _config_definition(policy_type: str) -> str:
    return f"{policy_type}_config"


def document_schema() -> dict[str, Any]:
    configs = policy_config_schemas()
    policy = {
        "type": "object",
        "required": ["name", "policy_type", "config"],
        "additionalProperties": False,
        "properties": {
            "name": _name("Unique in the tenant; APIs and plans refer to the policy by it."),
            "description": {"type": "string", "default": ""},
            "policy_type": {"enum": list(Policy.Type.values), "description": "Cannot change after creation."},
            "mode": _choice(list(Policy.Mode.values), Policy.Mode.ENFORCE, "shadow counts but never blocks."),
            "on_store_error": _choice(
                list(Policy.OnStoreError.values), Policy.OnStoreError.OPEN, "What the gateway does when Redis fails."
            ),
            "config": {"type": "object"},
        },
        "allOf": [
            {
                "if": {"properties": {"policy_type": {"const": policy_type}}},
                "then": {"properties": {"config": {"$ref": f"#/$defs/{_config_definition(policy_type)}"}}},
            }
            for policy_type in configs
        ],
    }
    issuer_special: dict[str, Any] = {
        "name": _name("Unique in the tenant; APIs and consumer identities refer to the issuer by it."),
        "audiences": _strings(
            "Accepted aud values; a token must name at least one.", max_items=validation.MAX_AUDIENCES, min_items=1
        ),
        "public_keys": {
            "type": ["object", "null"],
            "default": None,
            "description": 'Inline JWKS of public keys ({"keys": [...]}), instead of jwks_url.',
        },
        "algorithms": {
            "type": "array",
            "items": {"enum": list(validation.JWT_ALGORITHMS)},
            "minItems": 1,
            "uniqueItems": True,
            "default": ["RS256"],
            "description": "Accepted signature algorithms (never none or HS*).",
        },
    }
    jwt_issuer = {
        "type": "object",
        "required": ["name", "issuer", "audiences"],
        "additionalProperties": False,
        "properties": {
            name: issuer_special.get(name) or model_field_schema(JwtIssuer, name) for name in JWT_ISSUER_FIELDS
        },
    }
    plan = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _name("Unique in the tenant; APIs and subscriptions refer to the plan by it."),
            "description": {"type": "string", "default": ""},
            "approval": _choice(list(Plan.Approval.values), Plan.Approval.AUTO, "manual: an admin approves."),
            "archived": {
                "type": "boolean",
                "default": False,
                "description": "No new subscriptions (nor moves to it); existing ones keep it.",
            },
            "policies": _names("Names of the policies the plan's subscribers get."),
            "websocket_max_connections": model_field_schema(Plan, "websocket_max_connections"),
        },
    }
    target = {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "minLength": 1, "maxLength": 2000},
            "weight": {"type": "integer", "minimum": 1, "maximum": 100, "default": 1},
        },
    }
    special: dict[str, Any] = {
        "name": _name("Unique in the tenant: the API's key in this document."),
        "description": {"type": "string", "default": ""},
        "status": _choice(
            list(Api.Status.values),
            Api.Status.DRAFT,
            "draft → active ⇄ deprecated → retired; an API never goes back to draft or out of retired.",
        ),
        "base_path": {"type": "string", "pattern": "^/", "maxLength": 200, "description": "e.g. /api/users/v1"},
        "upstream_url": {"type": "string", "minLength": 1, "maxLength": 2000},
        "targets": {"type": "array", "items": target, "maxItems": 20, "description": "Extra weighted upstreams."},
        "sunset_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "default": None,
            "description": "Announced retirement (Sunset header), with a time zone.",
        },
        "policies": _names("Names of the policies applied to all of the API's traffic."),
        "plans": _names("Names of the plans the API offers; with any, a subscription must name one of them."),
        "jwt_issuers": _names("Names of the JWT issuers whose tokens the API accepts (auth_method jwt or key_or_jwt)."),
        "openapi_spec": {"type": ["object", "null"], "default": None, "description": "Shown in the portal."},
    }
    api = {
        "type": "object",
        "required": ["name", "base_path", "upstream_url"],
        "additionalProperties": False,
        "properties": {
            name: special.get(name) or model_field_schema(Api, API_MODEL_FIELD.get(name, name))
            for name in api_document_fields()
        },
    }
    subscription = {
        "type": "object",
        "required": ["api"],
        "additionalProperties": False,
        "properties": {
            "api": _name("Name of the API."),
            "plan": {"type": ["string", "null"], "default": None, "description": "Name of the plan (or none)."},
            "status": _choice(["active", "pending"], "active", "pending: requested, waiting for an admin."),
        },
    }
    identity = {
        "type": "object",
        "required": ["issuer", "external_id"],
        "additionalProperties": False,
        "properties": {
            "issuer": _name("Name of the JWT issuer."),
            "external_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "description": "The value of the issuer's consumer claim (sub …) in this consumer's tokens.",
            },
        },
    }
    consumer = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _name("Unique per owner."),
            "owner": {
                "type": ["string", "null"],
                "default": None,
                "description": "User name of a member of the tenant (none: an app the admins manage).",
            },
            "description": {"type": "string", "default": ""},
            "status": _choice(list(Consumer.Status.values), Consumer.Status.ACTIVE, "blocked: its keys are refused."),
            "ip_allow": {**_strings("CIDRs its requests may come from (empty: any).", max_items=1000), "default": []},
            "ip_deny": {**_strings("CIDRs its requests are refused from.", max_items=1000), "default": []},
            "identities": {
                "type": "array",
                "items": identity,
                "description": "Who the consumer is at each JWT issuer: its tokens act as it.",
            },
            "subscriptions": {"type": "array", "items": subscription, "description": "Open subscriptions."},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "apimgmt tenant configuration",
        "description": "One tenant's APIs, policies, JWT issuers, plans and (optionally) consumers, keyed by name. "
        "Keys, tokens and secrets are never part of it; a string may say ${ENV_VAR} to take a value from the "
        "environment.",
        "type": "object",
        "required": ["format"],
        "additionalProperties": False,
        "properties": {
            "format": {"const": FORMAT},
            "policies": {"type": "array", "items": policy},
            "jwt_issuers": {"type": "array", "items": jwt_issuer},
            "plans": {"type": "array", "items": plan},
            "apis": {"type": "array", "items": api},
            "consumers": {
                "type": "array",
                "items": consumer,
                "description": "Optional: without this section, consumers and subscriptions are left alone.",
            },
        },
        "$defs": {_config_definition(policy_type): schema for policy_type, schema in configs.items()},
    }


def schema_text() -> str:
    """The schema as checked in under docs/ (sorted keys, two-space indent, final newline)."""
    return json.dumps(document_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
