"""response_cache: GET and HEAD answers kept in Redis within the upstream's own Cache-Control, up to a TTL cap."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from apimgmt.policy_types import fields

POLICY_TYPE = "response_cache"
ALLOWED = {"ttl_seconds", "max_entry_bytes", "per_consumer", "count_hits_toward_quota", "vary_headers"}
MAX_TTL = 86_400
MAX_ENTRY_BYTES = 10 * 1024 * 1024
# The credential never becomes part of a shared key: per_consumer says "each caller its own entry" instead.
_NOT_VARY = {"authorization", "cookie", "x-api-key", "proxy-authorization"}


def validate(config: dict[str, Any]) -> dict[str, Any]:
    fields.check_known(config, ALLOWED, "response_cache config")
    vary = fields.header_names(config, "vary_headers", default=[])
    for index, name in enumerate(vary):
        if name.lower() in _NOT_VARY:
            raise ValidationError(
                f"vary_headers[{index}]: {name!r} carries credentials; set per_consumer true to give each consumer "
                "its own entries."
            )
    return {
        "ttl_seconds": fields.integer(config, "ttl_seconds", default=300, low=1, high=MAX_TTL),
        "max_entry_bytes": fields.integer(config, "max_entry_bytes", default=1_048_576, low=1, high=MAX_ENTRY_BYTES),
        "per_consumer": fields.boolean(config, "per_consumer", default=False),
        "count_hits_toward_quota": fields.boolean(config, "count_hits_toward_quota", default=True),
        "vary_headers": [name.lower() for name in vary],
    }
