"""Importing an API from its OpenAPI 3.0 or 3.1 document (YAML or JSON): validate, resolve $refs, map, save.

The document is checked against the official OpenAPI schemas that drf-spectacular ships (with jsonschema), and every
``$ref`` is resolved with ``referencing`` (jsonschema's own resolver), so a broken spec is refused with the place
that is wrong and nothing is created. The mapping:

- ``info.title`` → the API's name (an API of that name in the tenant is updated, else one is created);
  ``info.version`` and ``info.description`` → its description;
- ``servers[0]`` (variables filled with their defaults) → ``upstream_url``, unless one is given;
- security schemes → where the gateway reads the key: ``apiKey`` in a header → ``key_header``, in the query →
  ``key_query_param``, ``http`` ``bearer`` → ``accept_bearer``; others (OAuth 2, OpenID Connect, basic, cookies) do
  not map and are reported;
- the document itself → ``openapi_spec``, which the portal shows; with ``restrict_to_spec`` the gateway routes only
  its operations (apimgmt/spec_operations.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
from django.core.exceptions import ValidationError
from django.db import transaction

from apimgmt import services
from apimgmt.config_doc.document import ConfigError, Problem, clean_values, parse_text
from apimgmt.models import Api, Tenant

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Where the official OpenAPI schemas are (drf-spectacular validates its own output with them).
_SCHEMA_FILES = {"3.0": "openapi_3_0_schema.json", "3.1": "openapi_3_1_schema.json"}
_SERVER_VARIABLE = re.compile(r"\{([^{}]+)\}")
# The spec's own URI for resolving its internal references.
_SPEC_URI = "urn:apimgmt:imported-spec"


@dataclass
class ImportResult:
    api: Api
    created: bool
    operations: int
    notes: list[str] = field(default_factory=list)
    changes: dict[str, Any] = field(default_factory=dict)


@cache
def _openapi_validator(version: str) -> Any:
    text = resources.files("drf_spectacular.validation").joinpath(_SCHEMA_FILES[version]).read_text()
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema)


def _pointer(path: Any) -> str:
    """A JSON pointer (RFC 6901) to the place in the spec: /paths/~1pets~1{id}/get/responses/200."""
    return "/" + "/".join(str(part).replace("~", "~0").replace("/", "~1") for part in path) if path else "/"


def read_spec(text: str, source: str) -> dict[str, Any]:
    """Parse and validate an OpenAPI 3.0/3.1 document; ConfigError names the JSON pointer of each problem."""
    spec = clean_values(parse_text(text, source), source)
    if not isinstance(spec, dict):
        raise ConfigError(source, [Problem("", "an OpenAPI document is a mapping with openapi, info and paths.")])
    version = spec.get("openapi")
    if "swagger" in spec:
        raise ConfigError(source, [Problem("/swagger", "Swagger 2.0 is not supported; convert it to OpenAPI 3 first.")])
    if not isinstance(version, str) or version[:3] not in _SCHEMA_FILES:
        raise ConfigError(source, [Problem("/openapi", f"openapi must be a 3.0.x or 3.1.x version (got {version!r}).")])
    errors = sorted(_openapi_validator(version[:3]).iter_errors(spec), key=lambda e: list(map(str, e.absolute_path)))
    problems = [Problem(_pointer(e.absolute_path), _schema_message(e)) for e in errors[:20]]
    if problems:
        raise ConfigError(source, problems)
    problems = _unresolved_references(spec)
    if problems:
        raise ConfigError(source, problems)
    return spec


def _schema_message(error: jsonschema.ValidationError) -> str:
    # The official schemas use oneOf/anyOf for alternatives: the innermost reason says most.
    best = jsonschema.exceptions.best_match([error])
    return best.message if len(best.message) < 300 else best.message[:297] + "..."


def _unresolved_references(spec: dict[str, Any]) -> list[Problem]:
    """Every ``$ref`` must lead somewhere inside the document; external files and URLs are never fetched."""
    resource = referencing.Resource.from_contents(spec, default_specification=referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().with_resource(_SPEC_URI, resource).resolver(base_uri=_SPEC_URI)
    problems: list[Problem] = []
    stack: list[tuple[Any, list[Any]]] = [(spec, [])]
    while stack and len(problems) < 20:
        node, path = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                where = _pointer([*path, "$ref"])
                if not ref.startswith("#"):
                    problems.append(
                        Problem(
                            where, f"$ref {ref!r} points outside the document; bundle the spec into one file first."
                        )
                    )
                else:
                    try:
                        resolver.lookup(ref)
                    except referencing.exceptions.Unresolvable:
                        problems.append(Problem(where, f"$ref {ref!r} does not resolve to anything in the document."))
            stack.extend((value, [*path, key]) for key, value in node.items() if key != "$ref")
        elif isinstance(node, list):
            stack.extend((value, [*path, index]) for index, value in enumerate(node))
    return sorted(problems, key=lambda p: p.where)


def count_operations(spec: dict[str, Any]) -> int:
    return sum(
        1
        for item in (spec.get("paths") or {}).values()
        if isinstance(item, dict)
        for method in HTTP_METHODS
        if method in item
    )


def _server_url(server: dict[str, Any]) -> str:
    variables = server.get("variables") or {}

    def default(match: re.Match[str]) -> str:
        variable = variables.get(match.group(1)) or {}
        return str(variable.get("default", match.group(0)))

    return _SERVER_VARIABLE.sub(default, str(server.get("url", ""))).rstrip("/")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "api"


def _auth_fields(spec: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    schemes = ((spec.get("components") or {}).get("securitySchemes")) or {}
    fields: dict[str, Any] = {}
    mapped = False
    bearer = False
    for name in sorted(schemes):
        scheme = schemes[name]
        if not isinstance(scheme, dict) or "$ref" in scheme:
            continue
        kind, location = scheme.get("type"), scheme.get("in")
        if kind == "apiKey" and location == "header" and "key_header" not in fields:
            fields["key_header"] = scheme.get("name")
            mapped = True
        elif kind == "apiKey" and location == "query" and "key_query_param" not in fields:
            fields["key_query_param"] = scheme.get("name")
            mapped = True
        elif kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer":
            bearer = mapped = True
        else:
            notes.append(
                f"security scheme {name!r} ({kind}{' in ' + location if location else ''}) has no equivalent at the "
                "gateway, which checks API keys: not mapped."
            )
    if mapped:
        fields["accept_bearer"] = bearer
    return fields


def api_fields_from_spec(
    spec: dict[str, Any],
    *,
    source: str,
    upstream_url: str | None,
    base_path: str | None,
    restrict_to_spec: bool | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The API's fields as the spec gives them (name, description, upstream, key settings, the spec)."""
    info = spec["info"]
    notes: list[str] = []
    title = str(info["title"]).strip()
    if not title or len(title) > 100:
        raise ConfigError(
            source, [Problem("/info/title", "info.title must be 1-100 characters: it becomes the API's name.")]
        )
    parts = [f"Version {info['version']}."]
    if info.get("summary"):
        parts.append(str(info["summary"]))
    if info.get("description"):
        parts.append(str(info["description"]))
    fields: dict[str, Any] = {"api_name": title, "description": "\n\n".join(parts), "openapi_spec": spec}
    servers = [s for s in spec.get("servers") or [] if isinstance(s, dict)]
    if upstream_url:
        fields["upstream_url"] = upstream_url
    elif servers:
        url = _server_url(servers[0])
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                source,
                [
                    Problem(
                        "/servers/0/url", f"server URL {url!r} is not an absolute http(s) URL; give the upstream URL."
                    )
                ],
            )
        fields["upstream_url"] = url
        notes.extend(
            f"servers[{i}] {_server_url(s)} not used (servers[0] is the upstream)." for i, s in enumerate(servers) if i
        )
    if base_path:
        fields["base_path"] = base_path
    if restrict_to_spec is not None:
        fields["restrict_to_spec"] = restrict_to_spec
    fields.update(_auth_fields(spec, notes))
    return fields, notes


@transaction.atomic
def import_openapi(
    *,
    tenant: Tenant,
    text: str,
    source: str,
    actor: services.Actor,
    base_path: str | None = None,
    upstream_url: str | None = None,
    restrict_to_spec: bool | None = None,
) -> ImportResult:
    """Create the API the spec describes in the tenant, or update the API of the same name. All or nothing."""
    spec = read_spec(text, source)
    fields, notes = api_fields_from_spec(
        spec, source=source, upstream_url=upstream_url, base_path=base_path, restrict_to_spec=restrict_to_spec
    )
    existing = Api.objects.select_for_update().filter(tenant=tenant, api_name=fields["api_name"]).order_by("pk")
    matches = list(existing[:2])
    if len(matches) > 1:
        raise ConfigError(
            source, [Problem("/info/title", f"the tenant has several APIs named {fields['api_name']!r}.")]
        )
    try:
        if matches:
            api = matches[0]
            before = {name: getattr(api, name) for name in fields}
            api = services.api_update(api=api, actor=actor, **fields)
            changes: dict[str, Any] = {
                n: [before[n], fields[n]] for n in fields if before[n] != fields[n] and n != "openapi_spec"
            }
            if before["openapi_spec"] != spec:
                changes["openapi_spec"] = "replaced"
            return ImportResult(api=api, created=False, operations=count_operations(spec), notes=notes, changes=changes)
        if "upstream_url" not in fields:
            raise ConfigError(source, [Problem("/servers", "the spec names no server: give the upstream URL.")])
        fields.setdefault("base_path", "/" + _slug(fields["api_name"]))
        api = services.api_create(
            tenant=tenant,
            actor=actor,
            api_name=fields.pop("api_name"),
            base_path=fields.pop("base_path"),
            upstream_url=fields.pop("upstream_url"),
            **fields,
        )
    except ValidationError as exc:
        raise ConfigError(
            source,
            [
                Problem(name if name != "__all__" else "", message)
                for name, messages in getattr(exc, "message_dict", {"": exc.messages}).items()
                for message in messages
            ],
        ) from exc
    return ImportResult(api=api, created=True, operations=count_operations(spec), notes=notes)
