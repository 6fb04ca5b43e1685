"""headers: add, set and remove request headers (to the upstream) and response headers (to the client).

Values may hold templates filled per request: ``{consumer_id}``, ``{key_id}``, ``{tenant_id}``, ``{api_id}``,
``{request_id}``, ``{client_ip}`` and ``{jwt.<claim>}``; ``{{`` and ``}}`` are literal braces. Everything a transform
could use to smuggle a request (CR/LF), confuse a hop (hop-by-hop fields, Host, lengths), forge the gateway's own
fields (X-Forwarded-*, X-Request-ID, X-Consumer-ID, X-Tenant-ID), forge the CORS answer (Access-Control-* on
responses; replacing or removing Vary) or leak or replace the caller's credential is refused here, when the policy
is saved, and again when the gateway compiles it.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import fields

POLICY_TYPE = "headers"
ALLOWED = {"request", "response"}
OPERATIONS = {"add", "set", "remove"}
TEMPLATES = frozenset({"consumer_id", "key_id", "tenant_id", "api_id", "request_id", "client_ip"})
MAX_VALUE_LENGTH = 1024
MAX_PER_OPERATION = 50

# RFC 9110 7.6.1 hop-by-hop fields and their old companions: they describe one connection, never the next.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)
# Fields the gateway owns or that carry credentials: a transform may neither set nor remove them.
RESERVED = frozenset(
    {
        "host",
        "content-length",
        "authorization",
        "proxy-authorization",
        "proxy-authenticate",
        "x-api-key",
        "x-request-id",
        "forwarded",
        "x-real-ip",
        "x-consumer-id",
        "x-tenant-id",
    }
)
_CLAIM = re.compile(r"^[A-Za-z0-9_:-]{1,100}(?:\.[A-Za-z0-9_:-]{1,100}){0,4}\Z")
_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def refused_name(name: str) -> str | None:
    """Why a transform may not touch this header name, or None."""
    lower = name.lower()
    if lower in HOP_BY_HOP:
        return f"{name!r} is a hop-by-hop header (it describes one connection only)"
    if lower.startswith("x-forwarded-"):
        return f"{name!r} is set by the gateway from the client address it trusts"
    if lower == "host":
        return "'Host' names the upstream (the API's upstream_url sets it)"
    if lower in ("authorization", "proxy-authorization", "x-api-key"):
        return f"{name!r} carries the caller's credential"
    if lower in ("x-consumer-id", "x-tenant-id"):
        return f"{name!r} is the gateway's word to the upstream about the caller"
    if lower in RESERVED:
        return f"{name!r} is set by the gateway"
    return None


def refused_response_name(name: str, operation: str) -> str | None:
    """Why a response transform may not touch this name with this operation, or None: the CORS answer belongs to the
    cors policy, and ``Vary`` (which carries the cors policy's ``Origin`` and the upstream's own list) may be added
    to but not replaced or removed (a shared cache would then hand one caller's answer to another)."""
    lower = name.lower()
    if lower.startswith("access-control-"):
        return f"{name!r} is part of the CORS answer (use a cors policy)"
    if lower == "vary" and operation != "add":
        done = "replaced" if operation == "set" else "removed"
        return f"{name!r} tells caches which requests share an answer; it may be added, not {done}"
    return None


def check_value(value: Any, where: str) -> str:
    """A header value: printable ASCII (tab allowed), at most MAX_VALUE_LENGTH, with known templates only."""
    if not isinstance(value, str):
        raise ValidationError(f"{where} must be a string.")
    for char in value:
        if char in "\r\n":
            raise ValidationError(f"{where} contains a line break (CR or LF): it would start a new header.")
        if char == "\x00" or (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            raise ValidationError(f"{where} contains the control character U+{ord(char):04X}.")
        if ord(char) > 0x7E:
            raise ValidationError(f"{where} contains {char!r}: header values take printable ASCII only.")
    if len(value) > MAX_VALUE_LENGTH:
        raise ValidationError(f"{where} is longer than {MAX_VALUE_LENGTH} characters.")
    for match in _TEMPLATE_PART.finditer(value):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            raise ValidationError(f"{where} has an unmatched {token!r}; write {token * 2} for a literal brace.")
        name = match.group(1)
        if name in TEMPLATES or (name.startswith("jwt.") and _CLAIM.match(name[4:])):
            continue
        known = ", ".join(f"{{{t}}}" for t in sorted(TEMPLATES))
        raise ValidationError(f"{where} uses the unknown template {{{name}}}; known: {known} and {{jwt.<claim>}}.")
    return value


def _check_name(name: Any, where: str, side: str, operation: str) -> str:
    if not isinstance(name, str) or not fields.HEADER_NAME.match(name):
        raise ValidationError(f"{where}: {name!r} is not an HTTP header name (letters, digits, '-').")
    reason = refused_name(name) or (refused_response_name(name, operation) if side == "response" else None)
    if reason:
        raise ValidationError(f"{where}: {reason}; a transform cannot change it.")
    return name


def _side(config: Any, side: str) -> dict[str, Any]:
    fields.check_known(config, OPERATIONS, side)
    result: dict[str, Any] = {}
    owner: dict[str, str] = {}  # lower-cased name -> the operation that names it
    for operation in ("add", "set"):
        mapping = config.get(operation, {})
        where = f"{side}.{operation}"
        if not isinstance(mapping, dict):
            raise ValidationError(f"{where} must be an object of header name to value.")
        if len(mapping) > MAX_PER_OPERATION:
            raise ValidationError(f"{where} takes at most {MAX_PER_OPERATION} headers.")
        cleaned: dict[str, str] = {}
        for name, value in mapping.items():
            _check_name(name, where, side, operation)
            cleaned[name] = check_value(value, f"{where}.{name}")
            if name.lower() in owner:
                raise ValidationError(
                    f"{where}.{name}: {name!r} is also in {side}.{owner[name.lower()]}; name it once."
                )
            owner[name.lower()] = operation
        result[operation] = cleaned
    removals = config.get("remove", [])
    where = f"{side}.remove"
    if not isinstance(removals, list):
        raise ValidationError(f"{where} must be a list of header names.")
    if len(removals) > MAX_PER_OPERATION:
        raise ValidationError(f"{where} takes at most {MAX_PER_OPERATION} headers.")
    removed: list[str] = []
    for index, name in enumerate(removals):
        _check_name(name, f"{where}[{index}]", side, "remove")
        if name.lower() in owner:
            raise ValidationError(f"{where}[{index}]: {name!r} is also in {side}.{owner[name.lower()]}; name it once.")
        owner[name.lower()] = "remove"
        removed.append(name)
    result["remove"] = removed
    return result


def validate(config: dict[str, Any]) -> dict[str, Any]:
    fields.check_known(config, ALLOWED, "headers config")
    normalised = {side: _side(config.get(side, {}), side) for side in ("request", "response")}
    if not any(ops[op] for ops in normalised.values() for op in OPERATIONS):
        raise ValidationError("headers config needs at least one header in request or response (add, set or remove).")
    return normalised
