"""Importing an API from its OpenAPI 3.0 or 3.1 document (YAML or JSON): validate, resolve $refs, map, save.

The document is checked against the official OpenAPI schemas that drf-spectacular ships (with jsonschema), and every
``$ref`` is resolved with ``referencing`` (jsonschema's own resolver), so a broken spec is refused with the place
that is wrong and nothing is created. The mapping:

- ``info.title`` → the API's name (an API of that name in the tenant is updated, else one is created);
  ``info.version`` and ``info.description`` → its description;
- ``servers[0]`` (variables filled with their defaults) → ``upstream_url``, unless one is given;
- the security schemes the spec requires (its ``security``, top level and per operation) → how the gateway
  authenticates: ``apiKey`` in a header → ``key_header``, in the query → ``key_query_param``, an opaque ``http``
  ``bearer`` token → ``accept_bearer``; OpenID Connect, OAuth 2 and ``bearer`` with ``bearerFormat: JWT`` →
  ``auth_method`` jwt (key_or_jwt beside a key scheme) with the tenant's JWT issuer whose URL is exactly the
  OpenID Connect scheme's issuer (never one that merely shares its host), else a note that one must be attached
  first (always so for OAuth 2 and bearer JWT schemes, which name no issuer); basic and cookie schemes do not map
  and are reported;
- the document itself → ``openapi_spec``, which the portal shows; with ``restrict_to_spec`` the gateway routes only
  its operations (apimgmt/spec_operations.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
from django.core.exceptions import ValidationError
from django.db import transaction

from apimgmt import services
from apimgmt.config_doc.document import ConfigError, Problem, clean_values, parse_text
from apimgmt.models import Api, JwtIssuer, Tenant

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


# An OpenID Connect discovery URL is the issuer with this appended (OpenID Connect Discovery 1.0, section 4).
_OIDC_DISCOVERY = "/.well-known/openid-configuration"


def _required_schemes(spec: dict[str, Any], schemes: dict[str, Any], notes: list[str]) -> list[str]:
    """The security schemes the spec's requirements name: the top-level ``security`` (every operation's unless it
    says otherwise) and the operations' own. A spec that requires none declares what it has: all of them then."""
    requirements = [r for r in spec.get("security") or [] if isinstance(r, dict)]
    for item in (spec.get("paths") or {}).values():
        if isinstance(item, dict):
            for method in HTTP_METHODS:
                operation = item.get(method)
                if isinstance(operation, dict) and isinstance(operation.get("security"), list):
                    requirements.extend(r for r in operation["security"] if isinstance(r, dict))
    if "security" not in spec and not requirements:
        return sorted(schemes)
    if any(not requirement for requirement in requirements):
        notes.append("the spec's security allows calls without credentials ({}); the gateway still requires one.")
    required = sorted({name for requirement in requirements for name in requirement})
    notes.extend(
        f"security scheme {name!r} is declared but no security requirement uses it: not mapped."
        for name in sorted(set(schemes) - set(required))
    )
    notes.extend(
        f"security requirement {name!r} names no scheme in components.securitySchemes: not mapped."
        for name in required
        if name not in schemes
    )
    return [name for name in required if name in schemes]


def _issuer_key(url: str) -> str:
    """An issuer as compared: scheme and host in lower case, a default port and a final slash dropped; the path
    keeps its case (``https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC`` is not ``…_abc``)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text.rstrip("/")
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if port is not None and (scheme, port) not in (("https", 443), ("http", 80)):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}" + (f"?{parts.query}" if parts.query else "")


def _token_issuers(scheme: dict[str, Any], issuers: Sequence[JwtIssuer]) -> tuple[list[JwtIssuer], str]:
    """The tenant's issuers whose tokens a JWT scheme describes, and what they were looked for by (for a note).

    Only an openIdConnect scheme names its issuer (the discovery URL without the well-known suffix), and only the
    tenant's issuer with exactly that URL is attached. Never one on the same host: an identity provider's host is
    shared by all its tenants (login.microsoftonline.com, accounts.google.com, cognito-idp.<region>.amazonaws.com),
    so a host match would let the API accept tokens of the tenant's other directories (partners', staff's). An
    oauth2 scheme's URLs say where tokens are obtained, not who issues them, and a bearer JWT names no issuer:
    nothing is attached for them."""
    if scheme.get("type") == "openIdConnect":
        url = str(scheme.get("openIdConnectUrl", "")).strip().rstrip("/")
        issuer = url[: -len(_OIDC_DISCOVERY)] if url.endswith(_OIDC_DISCOVERY) else url
        return [i for i in issuers if _issuer_key(i.issuer) == _issuer_key(issuer)], f"issuer {issuer}"
    if scheme.get("type") == "oauth2":
        return [], "an oauth2 scheme names no issuer: attach the one its tokens carry in iss"
    return [], "issuer (a bearer JWT scheme names none)"


def _auth_fields(
    spec: dict[str, Any], notes: list[str], issuers: Sequence[JwtIssuer], attached: Sequence[JwtIssuer] = ()
) -> dict[str, Any]:
    """Where the gateway reads credentials, from the schemes the spec requires: API keys (``key_header``,
    ``key_query_param``, ``accept_bearer`` for a plain bearer token) and JWTs (``auth_method`` jwt, or key_or_jwt
    beside a key scheme, with the tenant's matching ``jwt_issuers``). ``attached``: the issuers the API already
    accepts, which serve when none matches."""
    schemes = {
        name: scheme
        for name, scheme in (((spec.get("components") or {}).get("securitySchemes")) or {}).items()
        if isinstance(scheme, dict) and "$ref" not in scheme
    }
    fields: dict[str, Any] = {}
    key = bearer = False
    tokens: list[str] = []
    for name in _required_schemes(spec, schemes, notes):
        scheme = schemes[name]
        kind, location = scheme.get("type"), scheme.get("in")
        http = str(scheme.get("scheme", "")).lower() if kind == "http" else ""
        if kind == "apiKey" and location in ("header", "query"):
            field_name = "key_header" if location == "header" else "key_query_param"
            if field_name in fields:
                notes.append(f"security scheme {name!r}: a second API key in the {location}: not mapped.")
                continue
            fields[field_name] = scheme.get("name")
            key = True
        elif http == "bearer" and str(scheme.get("bearerFormat", "")).upper() == "JWT":
            tokens.append(name)
        elif http == "bearer":
            bearer = key = True  # an opaque bearer token: an API key in the Authorization header
        elif kind in ("openIdConnect", "oauth2"):
            tokens.append(name)
        else:
            what = f"{kind}{' ' + http if http else ''}{' in ' + location if location else ''}"
            notes.append(
                f"security scheme {name!r} ({what}) has no equivalent at the gateway, which checks API keys and "
                "JWTs: not mapped."
            )
    if key:
        fields["accept_bearer"] = bearer
    if not tokens:
        if key:
            fields["auth_method"] = Api.AuthMethod.KEY
        return fields
    method = Api.AuthMethod.KEY_OR_JWT if key else Api.AuthMethod.JWT
    matched: dict[str, JwtIssuer] = {}
    unmatched: list[str] = []
    for name in tokens:
        found, looked_for = _token_issuers(schemes[name], issuers)
        matched.update((issuer.pk, issuer) for issuer in found)
        if not found:
            unmatched.append(f"{name!r} ({looked_for})")
    if matched:
        fields["jwt_issuers"] = sorted(matched.values(), key=lambda i: i.name)
        names = ", ".join(i.name for i in fields["jwt_issuers"])
        notes.append(
            f"security scheme(s) {', '.join(map(repr, tokens))} → auth_method {method}, JWT issuer(s) {names}."
        )
        if unmatched:
            notes.append(
                f"security scheme(s) {', '.join(unmatched)}: no JWT issuer of the tenant is attached for them; add "
                "the issuer and attach it to the API (jwt_issuers) if their tokens must be accepted too."
            )
    elif attached:
        notes.append(
            f"security scheme(s) {', '.join(map(repr, tokens))} → auth_method {method}, with the JWT issuer(s) the "
            "API already accepts (none of the tenant's issuers matches the spec)."
        )
    else:
        notes.append(
            f"security scheme(s) {', '.join(unmatched)} call for auth_method {method}, but no JWT issuer of the "
            f"tenant matches: add the issuer, attach it to the API (jwt_issuers) and set auth_method {method} before "
            "publishing; until then the API takes API keys only."
        )
        return fields
    fields["auth_method"] = method
    return fields


def _title(spec: dict[str, Any], source: str) -> str:
    title = str(spec["info"]["title"]).strip()
    if not title or len(title) > 100:
        raise ConfigError(
            source, [Problem("/info/title", "info.title must be 1-100 characters: it becomes the API's name.")]
        )
    return title


def api_fields_from_spec(
    spec: dict[str, Any],
    *,
    source: str,
    upstream_url: str | None,
    base_path: str | None,
    restrict_to_spec: bool | None = None,
    issuers: Sequence[JwtIssuer] = (),
    attached: Sequence[JwtIssuer] = (),
) -> tuple[dict[str, Any], list[str]]:
    """The API's fields as the spec gives them (name, description, upstream, credentials, the spec); ``issuers``
    are the tenant's JWT issuers, ``attached`` those the API already accepts."""
    info = spec["info"]
    notes: list[str] = []
    title = _title(spec, source)
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
    fields.update(_auth_fields(spec, notes, issuers, attached))
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
    title = _title(spec, source)
    existing = Api.objects.select_for_update().filter(tenant=tenant, api_name=title).order_by("pk")
    matches = list(existing[:2])
    if len(matches) > 1:
        raise ConfigError(source, [Problem("/info/title", f"the tenant has several APIs named {title!r}.")])
    attached = sorted(matches[0].jwt_issuers.all(), key=lambda i: i.name) if matches else []
    fields, notes = api_fields_from_spec(
        spec,
        source=source,
        upstream_url=upstream_url,
        base_path=base_path,
        restrict_to_spec=restrict_to_spec,
        issuers=list(JwtIssuer.objects.filter(tenant=tenant).order_by("name")),
        attached=attached,
    )
    jwt_issuers: list[JwtIssuer] | None = fields.pop("jwt_issuers", None)
    try:
        if matches:
            api = matches[0]
            before = {name: getattr(api, name) for name in fields}
            api = services.api_update(api=api, actor=actor, jwt_issuers=jwt_issuers, **fields)
            changes: dict[str, Any] = {
                n: [before[n], fields[n]] for n in fields if before[n] != fields[n] and n != "openapi_spec"
            }
            if before["openapi_spec"] != spec:
                changes["openapi_spec"] = "replaced"
            if jwt_issuers is not None and {i.pk for i in jwt_issuers} != {i.pk for i in attached}:
                changes["jwt_issuers"] = [[i.name for i in attached], [i.name for i in jwt_issuers]]
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
            jwt_issuers=jwt_issuers or (),
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
