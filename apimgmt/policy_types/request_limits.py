"""request_limits: the methods an API answers (405), its body size (413) and header count and size (431)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import fields

POLICY_TYPE = "request_limits"
ALLOWED = {"allowed_methods", "max_body_bytes", "max_headers", "max_header_bytes"}
MAX_BODY_BYTES = 10 * 1024**3
MAX_HEADERS = 1000
MAX_HEADER_BYTES = 1024 * 1024


def validate(config: dict[str, Any]) -> dict[str, Any]:
    fields.check_known(config, ALLOWED, "request_limits config")
    if not config:
        raise ValidationError(f"request_limits config needs at least one of {', '.join(sorted(ALLOWED))}.")
    normalised: dict[str, Any] = {}
    if "allowed_methods" in config:
        allowed = fields.methods(config, "allowed_methods", default=[])
        if not allowed:
            raise ValidationError('allowed_methods needs at least one method (e.g. ["GET", "POST"]).')
        normalised["allowed_methods"] = allowed
    bounds = {"max_body_bytes": MAX_BODY_BYTES, "max_headers": MAX_HEADERS, "max_header_bytes": MAX_HEADER_BYTES}
    for name, high in bounds.items():
        if name in config:  # null is refused like any other non-integer: leave the field out for "no limit"
            # A body cap of 0 is a real rule (no body at all); a request always has some headers.
            low = 0 if name == "max_body_bytes" else 1
            normalised[name] = fields.integer(config, name, default=None, low=low, high=high)
    return normalised
