"""cors: which browser origins may call the API, answered by the gateway (preflight before authentication)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from apimgmt.policy_types import fields

POLICY_TYPE = "cors"
ALLOWED = {"allow_origins", "allow_methods", "allow_headers", "expose_headers", "allow_credentials", "max_age"}
DEFAULT_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
MAX_AGE_LIMIT = 86_400
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def _origin(value: str, where: str) -> str:
    """``*``, an origin (``https://app.example.com``, ``http://localhost:3000``) or a pattern whose leftmost label
    is ``*`` (``https://*.example.com``: any subdomain, not example.com itself), lower-cased."""
    if value == "*":
        return value
    example = "such as https://app.example.com or https://*.example.com"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"{where}: {value!r} is not an origin {example}.") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{where}: {value!r} is not an origin {example} (scheme and host, nothing else).")
    if parts.path or parts.query or parts.fragment or value.endswith(("?", "#")) or "@" in parts.netloc:
        raise ValidationError(
            f"{where}: {value!r} has more than scheme, host and port; a browser sends "
            f"{parts.scheme.lower()}://{parts.netloc.lower()} (no path, not even '/')."
        )
    labels = parts.hostname.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            raise ValidationError(f"{where}: {value!r} matches a whole top-level domain; name one below it.")
    if not labels or not all(_LABEL.match(label) for label in labels):
        raise ValidationError(f"{where}: {value!r} has an invalid host; '*' may only stand for the leftmost label.")
    host = ".".join((["*"] if wildcard else []) + labels)
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    fields.check_known(config, ALLOWED, "cors config")
    if "allow_origins" not in config:
        raise ValidationError('allow_origins is required: the origins browsers may call from, or ["*"].')
    origins: list[str] = []
    for index, value in enumerate(fields.string_list(config, "allow_origins", default=[])):
        origin = _origin(value, f"allow_origins[{index}]")
        if origin not in origins:
            origins.append(origin)
    if not origins:
        raise ValidationError('allow_origins needs at least one origin, or ["*"] for any.')
    if "*" in origins and len(origins) > 1:
        raise ValidationError("allow_origins: '*' already allows every origin; list it alone.")
    credentials = fields.boolean(config, "allow_credentials", default=False)
    allow_headers = fields.header_names(config, "allow_headers", default=[], allow_star=True)
    expose_headers = fields.header_names(config, "expose_headers", default=[], allow_star=True)
    if credentials:
        # Browsers refuse a credentialed answer that says '*': the setting could never work, so it is not taken.
        if origins == ["*"]:
            raise ValidationError(
                "allow_credentials cannot be true with allow_origins ['*']: browsers refuse credentials for any "
                "origin; list the origins."
            )
        for name, names in (("allow_headers", allow_headers), ("expose_headers", expose_headers)):
            if "*" in names:
                raise ValidationError(f"{name} cannot contain '*' with allow_credentials true; list the headers.")
    elif "*" in allow_headers and len(allow_headers) > 1:
        raise ValidationError("allow_headers: '*' already allows every header; list it alone.")
    return {
        "allow_origins": origins,
        "allow_methods": fields.methods(config, "allow_methods", default=DEFAULT_METHODS),
        "allow_headers": allow_headers,
        "expose_headers": expose_headers,
        "allow_credentials": credentials,
        "max_age": fields.integer(config, "max_age", default=600, low=0, high=MAX_AGE_LIMIT),
    }
