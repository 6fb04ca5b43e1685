"""Management API serializers: they validate shape and render rows; the services do every write."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db.models import Manager
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apimgmt.models import (
    DEFAULT_ROTATION_OVERLAP_SECONDS,
    TENANT_ID_VALIDATOR,
    Api,
    ApiKey,
    AuditEvent,
    Consumer,
    ConsumerIdentity,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    UpstreamTarget,
)
from apimgmt.services import API_FIELDS, MAX_OVERLAP_SECONDS
from apimgmt.validation import JWT_ALGORITHMS

MAX_JSON_DEPTH = 32
ID_FIELD_LENGTH = 32


def _check_json(value: Any, depth: int = 0) -> None:
    """PostgreSQL's jsonb refuses NUL characters and very deep documents: say so instead of failing later."""
    if depth > MAX_JSON_DEPTH:
        raise serializers.ValidationError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels.")
    if isinstance(value, str):
        if "\x00" in value:
            raise serializers.ValidationError("JSON strings must not contain NUL (\\u0000) characters.")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, depth + 1)
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


class StrictCharField(serializers.CharField):
    """A JSON string: a number or a boolean is refused, not turned into text (DRF's CharField would take 0 as "0")."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON number without a fraction: strings ("5") and booleans are refused."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, (str, bool)):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number: strings ("1.5") and booleans are refused."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, (str, bool)):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """JSON true or false: "yes", 1 and "true" are refused."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


# What a model field becomes in a request body: the JSON type the schema states, nothing DRF would coerce into it.
_STRICT_FIELDS: dict[type[serializers.Field], type[serializers.Field]] = {
    serializers.CharField: StrictCharField,
    serializers.IntegerField: StrictIntegerField,
    serializers.FloatField: StrictFloatField,
    serializers.BooleanField: StrictBooleanField,
}


class SafeJSONField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        _check_json(value)
        return value


class JSONObjectField(SafeJSONField):
    """A JSON object (not a list, string or number)."""

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            raise serializers.ValidationError("Must be a JSON object.")
        return value


class IdListField(serializers.ListField):
    """A list of related ids, rendered from a many-to-many manager."""

    child = StrictCharField(max_length=ID_FIELD_LENGTH)

    def to_representation(self, data: Any) -> list[str]:
        if isinstance(data, Manager):
            return [str(item.pk) for item in data.all()]
        return [str(item) for item in data]


class StrictSerializerMixin:
    """Reject unknown fields (naming them) instead of ignoring them; create-only fields stay put on update."""

    create_only_fields: tuple[str, ...] = ()

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            fields = self.fields  # type: ignore[attr-defined]
            writable = {name for name, f in fields.items() if not f.read_only}
            errors: dict[str, list[str]] = {}
            for name in data:
                if name in writable:
                    continue
                if name in fields:
                    errors[name] = ["This field is read-only."]
                else:
                    errors[str(name)] = ["Unknown field."]
            instance = getattr(self, "instance", None)
            if instance is not None:
                for name in self.create_only_fields:
                    source = fields[name].source
                    if name in data and data[name] != getattr(instance, source):
                        errors[name] = [f"{name} cannot be changed after creation."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictSerializer(StrictSerializerMixin, serializers.Serializer):
    pass


class StrictModelSerializer(StrictSerializerMixin, serializers.ModelSerializer):
    serializer_field_mapping = {
        model_field: _STRICT_FIELDS.get(field, field)
        for model_field, field in serializers.ModelSerializer.serializer_field_mapping.items()
    }

    class Meta:
        validators: list[Any] = []  # uniqueness is the services' job, with their messages


class WholeItemSerializer(StrictModelSerializer):
    """An item of a list that replaces the whole list: its required fields stay required in a PATCH.

    DRF hands a partial update down to nested serializers, which then skip their required fields; but a PATCH
    that sends ``targets`` replaces every target, so each item must be complete.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            missing = {
                name: [str(field.error_messages["required"])]
                for name, field in self.fields.items()
                if field.required and not field.read_only and name not in data
            }
            if missing:
                raise serializers.ValidationError(missing)
        return super().to_internal_value(data)


@extend_schema_field({"type": "object", "additionalProperties": True})
class OpenApiDocumentField(JSONObjectField):
    """An API's OpenAPI document: always an object in answers (``{}`` while there is none), never null."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("help_text", "The API's OpenAPI document; {} when it has none. Send {} to remove it.")
        # DRF formats error messages: "{{}}" is a literal "{}".
        kwargs.setdefault("error_messages", {"null": "Send {{}} for no OpenAPI document, not null."})
        super().__init__(**kwargs)

    def get_attribute(self, instance: Any) -> Any:
        value = super().get_attribute(instance)
        return {} if value is None else value

    def to_internal_value(self, data: Any) -> Any:
        # Stored as "no document" (what the admin, the portal and config documents also write), shown as {}.
        return super().to_internal_value(data) or None


# ---------------------------------------------------------------------------
# Tenants
# ---------------------------------------------------------------------------


class TenantSerializer(StrictModelSerializer):
    """A tenant: an organisation owning APIs, consumers, plans and policies. Its id is a slug."""

    id = StrictCharField(max_length=63, validators=[TENANT_ID_VALIDATOR], help_text="Slug, e.g. acme.")
    create_only_fields = ("id",)

    class Meta:
        model = Tenant
        fields = ["id", "name", "status", "timezone", "open_signup", "created_at"]
        read_only_fields = ["status", "created_at"]
        validators: list[Any] = []


# ---------------------------------------------------------------------------
# Policies and plans
# ---------------------------------------------------------------------------


class PolicySerializer(StrictModelSerializer):
    """A policy; `config` is validated per `policy_type` (docs/policies.md: one schema component per type)."""

    tenant_id = StrictCharField(max_length=63)
    config = JSONObjectField(help_text='Validated per policy_type; e.g. {"requests_per_minute": 1000}.')
    create_only_fields = ("tenant_id",)

    class Meta:
        model = Policy
        fields = [
            "id",
            "tenant_id",
            "name",
            "description",
            "policy_type",
            "config",
            "mode",
            "on_store_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        validators: list[Any] = []


class PlanSerializer(StrictModelSerializer):
    """A subscription plan: the policies its subscribers get and whether subscribing needs approval."""

    tenant_id = StrictCharField(max_length=63)
    policies = IdListField(required=False, max_length=100, help_text="Policy ids of the same tenant.")
    create_only_fields = ("tenant_id",)

    class Meta:
        model = Plan
        fields = [
            "id",
            "tenant_id",
            "name",
            "description",
            "policies",
            "approval",
            "websocket_max_connections",
            "archived_at",
            "created_at",
            "updated_at",
        ]
        # archived_at changes through POST plans/{id}/archive/ and unarchive/ (apimgmt/api/webhook_views.py).
        read_only_fields = ["id", "archived_at", "created_at", "updated_at"]
        validators: list[Any] = []


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------


class TargetSerializer(WholeItemSerializer):
    """One extra upstream: every target needs its url (weight defaults to 1)."""

    class Meta:
        model = UpstreamTarget
        fields = ["url", "weight"]
        validators: list[Any] = []


class ApiSerializer(StrictModelSerializer):
    """An API as its tenant's admins, viewers and platform staff see it, upstreams and key settings included."""

    tenant_id = StrictCharField(max_length=63)
    policies = IdListField(required=False, max_length=100, help_text="Policy ids applied to all traffic.")
    plans = IdListField(
        required=False,
        max_length=100,
        help_text="Plan ids of the same tenant that this API offers. When any are listed, a subscription must name "
        "one of them.",
    )
    targets = TargetSerializer(  # type: ignore[call-arg]  # ListSerializer takes max_length; the stubs lag
        many=True, required=False, max_length=20, help_text="Extra weighted upstreams."
    )
    openapi_spec = OpenApiDocumentField(required=False)
    jwt_issuers = IdListField(
        required=False,
        max_length=20,
        help_text="JWT issuer ids of the same tenant whose tokens this API accepts (auth_method jwt or key_or_jwt).",
    )
    create_only_fields = ("tenant_id",)

    class Meta:
        model = Api
        # The writable fields are exactly what the API services accept (one list, in services.API_FIELDS).
        fields = [
            "id",
            "tenant_id",
            "status",
            *API_FIELDS,
            "targets",
            "policies",
            "plans",
            "jwt_issuers",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        validators: list[Any] = []


class ApiCatalogSerializer(serializers.ModelSerializer):
    """An API as developers see it in the catalog: how to call it and its documentation, nothing internal.

    Upstream addresses, extra targets, key settings, timeouts, retries, circuit-breaker settings and policies are
    left out: they are the tenant's infrastructure, not part of what a developer calls.
    """

    tenant_id = StrictCharField(read_only=True)
    openapi_spec = OpenApiDocumentField(read_only=True)
    plans = IdListField(read_only=True, help_text="The plans to subscribe on; when any are listed, choose one.")

    class Meta:
        model = Api
        fields = [
            "id",
            "tenant_id",
            "api_name",
            "description",
            "base_path",
            "host",
            "status",
            "sunset_at",
            "subscription_approval",
            "auth_method",
            "plans",
            "openapi_spec",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ApiDeprecateSerializer(StrictSerializer):
    """Deprecate an API, optionally announcing when it retires (the Sunset header)."""

    sunset_at = serializers.DateTimeField(required=False, allow_null=True, help_text="Announced retirement date.")


class EmptySerializer(StrictSerializer):
    """No body (any field is rejected)."""


# ---------------------------------------------------------------------------
# JWT issuers
# ---------------------------------------------------------------------------


class JwtIssuerSerializer(StrictModelSerializer):
    """An identity provider whose tokens the tenant's APIs may accept; validated as a whole by the services."""

    tenant_id = StrictCharField(max_length=63)
    audiences = serializers.ListField(
        child=StrictCharField(max_length=500),
        max_length=20,
        required=False,
        help_text="Accepted aud values (at least one).",
    )
    public_keys = JSONObjectField(
        required=False,
        allow_null=True,
        help_text='Inline JWKS {"keys": [...]} of public keys; null when the keys come from jwks_url.',
    )
    # Plain strings here: the services say why "none" or HS256 is refused, which a choice list could not.
    algorithms = serializers.ListField(
        child=StrictCharField(max_length=16),
        min_length=1,
        max_length=len(JWT_ALGORITHMS),
        required=False,
        help_text=f"Accepted signature algorithms, from {', '.join(JWT_ALGORITHMS)} (never none or HS*). "
        "Default [RS256].",
    )
    create_only_fields = ("tenant_id",)

    class Meta:
        model = JwtIssuer
        fields = [
            "id",
            "tenant_id",
            *JwtIssuer.SETTINGS,
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        validators: list[Any] = []


# ---------------------------------------------------------------------------
# Consumers and keys
# ---------------------------------------------------------------------------


def _ip_list(help_text: str) -> serializers.ListField:
    return serializers.ListField(
        child=StrictCharField(max_length=49), max_length=1000, required=False, help_text=help_text
    )


IP_ALLOW_HELP = "CIDRs (IPv4 or IPv6) allowed to call with it; when any are listed, every other address gets 403."
IP_DENY_HELP = "CIDRs refused (403), whatever ip_allow says."


class ConsumerSerializer(StrictModelSerializer):
    """A consumer (an "app" in the portal): who calls APIs, with keys and subscriptions."""

    tenant_id = StrictCharField(max_length=63)
    owner: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="Username of the developer who owns it; null for consumers made by an admin or staff.",
    )
    ip_allow = _ip_list(IP_ALLOW_HELP)
    ip_deny = _ip_list(IP_DENY_HELP)
    create_only_fields = ("tenant_id",)

    class Meta:
        model = Consumer
        fields = ["id", "tenant_id", "name", "description", "owner", "status", "ip_allow", "ip_deny", "created_at"]
        read_only_fields = ["id", "created_at"]
        validators: list[Any] = []


class ApiKeySerializer(StrictModelSerializer):
    """An API key of a consumer; the plaintext is never part of it (see the create and rotate answers)."""

    consumer_id = StrictCharField(max_length=ID_FIELD_LENGTH)
    tenant_id = StrictCharField(source="consumer.tenant_id", read_only=True)
    rotated_from = StrictCharField(source="rotated_from_id", read_only=True, allow_null=True)
    ip_allow = _ip_list(IP_ALLOW_HELP)
    ip_deny = _ip_list(IP_DENY_HELP)
    create_only_fields = ("consumer_id",)

    class Meta:
        model = ApiKey
        fields = [
            "key_id",
            "consumer_id",
            "tenant_id",
            "name",
            "key_prefix",
            "active",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "rotated_from",
            "ip_allow",
            "ip_deny",
            "created_at",
        ]
        read_only_fields = ["key_id", "key_prefix", "active", "last_used_at", "revoked_at", "created_at"]
        validators: list[Any] = []


class ApiKeyUpdateSerializer(StrictSerializer):
    """Rename a key or change its IP lists (PATCH); gateways drop their cached copy of the key at once."""

    name = StrictCharField(max_length=100, required=False, allow_blank=True)
    ip_allow = _ip_list(IP_ALLOW_HELP)
    ip_deny = _ip_list(IP_DENY_HELP)


class ConsumerIdentitySerializer(StrictModelSerializer):
    """Who a consumer is at a JWT issuer: tokens whose consumer claim is `external_id` act as the consumer."""

    consumer_id = StrictCharField(read_only=True)
    issuer_id = StrictCharField(max_length=ID_FIELD_LENGTH, help_text="A JWT issuer of the consumer's tenant.")

    class Meta:
        model = ConsumerIdentity
        fields = ["id", "consumer_id", "issuer_id", "external_id", "created_at"]
        read_only_fields = ["id", "created_at"]
        validators: list[Any] = []


class ApiKeyCreatedSerializer(ApiKeySerializer):
    """A key just created, with its plaintext `key`: the only answer that ever carries it."""

    key = StrictCharField(read_only=True, help_text="The plaintext key. Shown in this response only.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class ApiKeyRotatedSerializer(ApiKeyCreatedSerializer):
    """The successor key with its plaintext, and when the rotated key stops working."""

    previous_key_expires_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="When the rotated key stops working."
    )

    class Meta(ApiKeyCreatedSerializer.Meta):
        fields = [*ApiKeyCreatedSerializer.Meta.fields, "previous_key_expires_at"]


class ApiKeyRotateSerializer(StrictSerializer):
    """Rotate a key: a successor now, the old key working for `overlap_seconds` more."""

    overlap_seconds = StrictIntegerField(
        min_value=0,
        max_value=MAX_OVERLAP_SECONDS,
        default=DEFAULT_ROTATION_OVERLAP_SECONDS,
        help_text="How long the old key keeps working (0 = stops now).",
    )
    name = StrictCharField(max_length=100, required=False, allow_blank=True, help_text="Name of the new key.")


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


class SubscriptionSerializer(StrictModelSerializer):
    """A consumer's access to an API on a plan; pending ones wait for a tenant admin."""

    tenant_id = StrictCharField(source="consumer.tenant_id", read_only=True)
    consumer_id = StrictCharField(max_length=ID_FIELD_LENGTH)
    api_id = StrictCharField(max_length=ID_FIELD_LENGTH)
    plan_id = StrictCharField(max_length=ID_FIELD_LENGTH, required=False, allow_null=True)
    decided_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="Username of who approved, rejected or cancelled it; null while pending or if decided automatically.",
    )
    pending_plan_id = serializers.CharField(
        read_only=True,
        allow_null=True,
        help_text="The plan it moves to: at plan_change_at, or (no date) when a tenant admin grants the request.",
    )
    plan_change_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = Subscription
        fields = [
            "id",
            "tenant_id",
            "consumer_id",
            "api_id",
            "plan_id",
            "status",
            "decided_by",
            "decided_at",
            "decision_note",
            "pending_plan_id",
            "plan_change_at",
            "created_at",
        ]
        read_only_fields = ["id", "status", "decided_at", "decision_note", "created_at"]
        validators: list[Any] = []


class DecisionSerializer(StrictSerializer):
    """An optional note for an approval, rejection or cancellation."""

    note = StrictCharField(max_length=500, required=False, allow_blank=True, default="")


# ---------------------------------------------------------------------------
# Usage and audit
# ---------------------------------------------------------------------------


class UsageQuerySerializer(StrictSerializer):
    """Query parameters of GET usage/ (unknown parameters are rejected)."""

    tenant_id = StrictCharField(max_length=63, required=False)
    api_id = StrictCharField(max_length=ID_FIELD_LENGTH, required=False)
    consumer_id = StrictCharField(max_length=ID_FIELD_LENGTH, required=False)
    key_id = StrictCharField(max_length=ID_FIELD_LENGTH, required=False)
    interval = serializers.ChoiceField(choices=["minute", "hour", "day"], default="hour")
    group_by = serializers.ChoiceField(
        choices=["api_id", "consumer_id", "key_id", "status_code"], required=False, help_text="A second dimension."
    )
    # "from" is a keyword in Python; the field is declared under its wire name below.
    to = serializers.DateTimeField(required=False, help_text="End (exclusive); default now.")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = serializers.DateTimeField(
            required=False, help_text="Start (inclusive); default 24 h before to."
        )
        return fields


class UsageBucketSerializer(serializers.Serializer):
    bucket = serializers.DateTimeField(help_text="Start of the interval (UTC).")
    api_id = serializers.CharField(required=False, help_text="Present with group_by=api_id.")
    consumer_id = serializers.CharField(required=False, help_text="Present with group_by=consumer_id.")
    key_id = serializers.CharField(required=False, help_text="Present with group_by=key_id.")
    status_code = serializers.IntegerField(required=False, help_text="Present with group_by=status_code.")
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()  # type: ignore[assignment]  # a field, popped by the metaclass
    rate_limited = serializers.IntegerField(help_text="Requests answered 429.")
    bytes_in = serializers.IntegerField()
    bytes_out = serializers.IntegerField()
    latency_ms_avg = serializers.FloatField()
    latency_ms_max = serializers.FloatField()
    connections = serializers.IntegerField(help_text="WebSocket connections opened (their handshakes are requests).")
    connection_seconds = serializers.FloatField(help_text="Time WebSocket connections were open.")
    messages_in = serializers.IntegerField(help_text="WebSocket messages from clients (their bytes: bytes_in).")
    messages_out = serializers.IntegerField(help_text="WebSocket messages to clients (their bytes: bytes_out).")


class UsageSerializer(serializers.Serializer):
    interval = serializers.CharField()
    # Declared as fields named from/to below for the same reason as in UsageQuerySerializer.
    to = serializers.DateTimeField()
    results = UsageBucketSerializer(many=True)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = serializers.DateTimeField()
        return fields


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_repr", read_only=True)
    tenant_id = serializers.CharField(read_only=True, allow_null=True)
    changes = serializers.JSONField(read_only=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "at", "actor", "tenant_id", "action", "object_type", "object_id", "changes", "request_id", "ip"]
        read_only_fields = fields


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details."""

    type = serializers.CharField()
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    errors = serializers.DictField(  # type: ignore[assignment]  # a field, popped by the metaclass
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text='Field errors: {"field": ["message", …]}.',
    )
    request_id = serializers.CharField(required=False)
