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
from apimgmt.models import Api, Consumer, Plan, Policy

FORMAT = "apimgmt/config/v1"
# An API in the document: these first, in this order (what people look for), then every other field the API services
# accept (services.API_FIELDS, in their order), then what it refers to. A field added to the services is thereby
# exported, planned and applied, with its schema taken from the model field.
API_LEADING: tuple[str, ...] = ("name", "description", "status", "visibility", "subscription_approval")
API_LEADING += ("base_path", "host", "strip_path", "upstream_url", "targets")
API_TRAILING = ("policies", "plans", "openapi_spec")
# Document field -> model field, where they differ.
API_MODEL_FIELD = {"name": "api_name"}


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


def document_schema() -> dict[str, Any]:
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
    quota_config = _policy_config(list(validation.QUOTA_WINDOWS), {})
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
                "if": {"properties": {"policy_type": {"const": Policy.Type.RATE_LIMITING}}},
                "then": {"properties": {"config": rate_config}},
            },
            {
                "if": {"properties": {"policy_type": {"const": Policy.Type.QUOTA}}},
                "then": {"properties": {"config": quota_config}},
            },
        ],
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
            "subscriptions": {"type": "array", "items": subscription, "description": "Open subscriptions."},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "apimgmt tenant configuration",
        "description": "One tenant's APIs, policies, plans and (optionally) consumers, keyed by name. Keys, tokens "
        "and secrets are never part of it; a string may say ${ENV_VAR} to take a value from the environment.",
        "type": "object",
        "required": ["format"],
        "additionalProperties": False,
        "properties": {
            "format": {"const": FORMAT},
            "policies": {"type": "array", "items": policy},
            "plans": {"type": "array", "items": plan},
            "apis": {"type": "array", "items": api},
            "consumers": {
                "type": "array",
                "items": consumer,
                "description": "Optional: without this section, consumers and subscriptions are left alone.",
            },
        },
    }


def schema_text() -> str:
    """The schema as checked in under docs/ (sorted keys, two-space indent, final newline)."""
    return json.dumps(document_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
