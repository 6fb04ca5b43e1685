"""The policy types in the OpenAPI schema: one config component per type, and a policy as one of one component per
type, told apart by ``policy_type`` (oneOf with a discriminator mapping).

These serializers describe; they do not validate. What a config may hold is decided once, by
``apimgmt.validation.validate_policy_config`` (through the services), so the admin, the management API and
configuration documents refuse the same configs with the same messages. Keep the two in step: the tests round-trip
every type's example through both.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from apimgmt import limits
from apimgmt.api.serializers import PolicySerializer
from apimgmt.models import Policy
from apimgmt.policy_types import cors, headers, request_limits, response_cache


def _ints(low: int, high: int = 10**12, **kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=low, max_value=high, required=False, **kwargs)


def _names(help_text: str, **kwargs: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, help_text=help_text, **kwargs
    )


def _cidrs(help_text: str) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=49), required=False, max_length=1000, help_text=help_text
    )


class RateLimitingConfigSerializer(serializers.Serializer):
    """Requests per window (at least one window), counted per `key_extraction`."""

    requests_per_second = _ints(1)
    requests_per_minute = _ints(1)
    requests_per_hour = _ints(1)
    requests_per_day = _ints(1)
    burst_size = _ints(0, help_text="Extra requests above the rate (sliding windows only).")
    key_extraction = serializers.ChoiceField(choices=list(limits.SCOPES), required=False)
    window_type = serializers.ChoiceField(choices=["sliding", "fixed"], required=False)


class QuotaConfigSerializer(serializers.Serializer):
    """Requests per day and/or calendar month in the tenant's time zone."""

    requests_per_day = _ints(1)
    requests_per_month = _ints(1)
    key_extraction = serializers.ChoiceField(choices=list(limits.SCOPES), required=False)


class CorsConfigSerializer(serializers.Serializer):
    """Browser cross-origin access, answered by the gateway (preflight before authentication)."""

    allow_origins = serializers.ListField(
        child=serializers.CharField(max_length=300),
        min_length=1,
        help_text='Exact origins ("https://app.example.com"), patterns ("https://*.example.com") or ["*"].',
    )
    allow_methods = _names(f"Default {', '.join(cors.DEFAULT_METHODS)}.")
    allow_headers = _names('Request headers a browser may send; "*" for any (not with credentials).')
    expose_headers = _names("Response headers a browser script may read.")
    allow_credentials = serializers.BooleanField(
        required=False, help_text='Cookies and credentials; refused with allow_origins ["*"]. Default false.'
    )
    max_age = _ints(0, cors.MAX_AGE_LIMIT, help_text="Seconds a browser may cache a preflight answer. Default 600.")


class IpRulesConfigSerializer(serializers.Serializer):
    """Allow and deny lists of CIDRs: deny wins; a non-empty allow list refuses every other address."""

    allow = _cidrs("CIDRs allowed, e.g. 203.0.113.0/24 or 2001:db8::/32.")
    deny = _cidrs("CIDRs refused.")


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": headers.MAX_VALUE_LENGTH},
        "maxProperties": headers.MAX_PER_OPERATION,
        "description": "Header name to value; values may use {consumer_id}, {key_id}, {tenant_id}, {api_id}, "
        "{request_id}, {client_ip} and {jwt.<claim>} ({{ and }} for literal braces).",
    }
)
class HeaderValuesField(serializers.DictField):
    """Header name → value (documentation only)."""


class HeaderOperationsSerializer(serializers.Serializer):
    """Add (keep existing values), set (replace) or remove headers."""

    add = HeaderValuesField(required=False)
    set = HeaderValuesField(required=False)
    remove = _names("Header names to remove.", max_length=headers.MAX_PER_OPERATION)


class HeadersConfigSerializer(serializers.Serializer):
    """Header transforms on the request to the upstream and on the response to the client."""

    request = HeaderOperationsSerializer(required=False)
    response = HeaderOperationsSerializer(required=False)


class RequestLimitsConfigSerializer(serializers.Serializer):
    """Refuse requests before they reach the upstream (at least one setting)."""

    allowed_methods = _names("Other methods get 405 with Allow.")
    max_body_bytes = _ints(0, request_limits.MAX_BODY_BYTES, help_text="A larger body gets 413.")
    max_headers = _ints(1, request_limits.MAX_HEADERS, help_text="More request headers get 431.")
    max_header_bytes = _ints(1, request_limits.MAX_HEADER_BYTES, help_text="Larger request headers get 431.")


class ResponseCacheConfigSerializer(serializers.Serializer):
    """GET and HEAD answers cached in Redis within the upstream's Cache-Control, up to ttl_seconds."""

    ttl_seconds = _ints(1, response_cache.MAX_TTL, help_text="The longest an entry lives. Default 300.")
    max_entry_bytes = _ints(1, response_cache.MAX_ENTRY_BYTES, help_text="Larger answers are not kept.")
    per_consumer = serializers.BooleanField(required=False, help_text="Each consumer its own entries. Default false.")
    count_hits_toward_quota = serializers.BooleanField(required=False, help_text="Default true.")
    vary_headers = _names("Request headers that are part of the cache key, beyond the upstream's Vary.")


CONFIG_SERIALIZERS: dict[str, type[serializers.Serializer]] = {
    Policy.Type.RATE_LIMITING.value: RateLimitingConfigSerializer,
    Policy.Type.QUOTA.value: QuotaConfigSerializer,
    Policy.Type.CORS.value: CorsConfigSerializer,
    Policy.Type.IP_RULES.value: IpRulesConfigSerializer,
    Policy.Type.HEADERS.value: HeadersConfigSerializer,
    Policy.Type.REQUEST_LIMITS.value: RequestLimitsConfigSerializer,
    Policy.Type.RESPONSE_CACHE.value: ResponseCacheConfigSerializer,
}


def _policy_of_type(policy_type: str, config: type[serializers.Serializer]) -> type[PolicySerializer]:
    """A PolicySerializer whose policy_type is this one type and whose config is this type's component."""
    label = Policy.Type(policy_type).label
    # A pattern rather than a one-value enum: drf-spectacular would lift every such enum into its own component and
    # rename them after each other ("1cd" hashes); the discriminator mapping names the type either way.
    camel = "".join(part.title() for part in policy_type.split("_"))
    type_field = extend_schema_field(
        {"type": "string", "pattern": f"^{policy_type}$", "description": f"Always {policy_type}."}
    )(type(f"{camel}TypeField", (serializers.CharField,), {"__module__": __name__}))
    return type(
        f"{camel}PolicySerializer",
        (PolicySerializer,),
        {
            "__doc__": f"A {policy_type} policy: {label}.",
            "__module__": __name__,
            "policy_type": type_field(),
            "config": config(),
            "Meta": type("Meta", (PolicySerializer.Meta,), {}),
        },
    )


POLICY_SERIALIZERS: dict[str, type[PolicySerializer]] = {
    policy_type: _policy_of_type(policy_type, config) for policy_type, config in CONFIG_SERIALIZERS.items()
}


def typed_policy(many: bool = False) -> PolymorphicProxySerializer:
    """A policy as one of the per-type components, discriminated by ``policy_type``."""
    return PolymorphicProxySerializer(
        component_name="Policy",
        serializers=POLICY_SERIALIZERS,  # type: ignore[arg-type]  # a mapping is documented and supported
        resource_type_field_name="policy_type",
        many=many,
    )
