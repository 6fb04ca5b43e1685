"""The apimgmt domain: tenants, APIs, consumers and their keys, plans, policies, subscriptions, usage and audit.

Table and column names follow the operations guide (``am_apis.api_name``,
``am_api_keys.key_prefix`` …) so its SQL runs as written.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils.timezone import now

from apimgmt import ids

TENANT_ID_VALIDATOR = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z",
    "Use 1-63 lowercase letters, digits and hyphens, not starting or ending with a hyphen.",
)


class Tenant(models.Model):
    """An organisation that owns APIs, consumers and policies. Its id is a slug such as ``acme``."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    id = models.CharField("ID", primary_key=True, max_length=63, validators=[TENANT_ID_VALIDATOR])
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    timezone = models.CharField(
        max_length=64, default="UTC", help_text="IANA time zone; quota days and months follow it."
    )
    open_signup = models.BooleanField(
        "open portal sign-up", default=False, help_text="Anyone may sign up in this tenant's portal."
    )
    created_at = models.DateTimeField(default=now, editable=False)

    class Meta:
        db_table = "am_tenants"
        ordering = ["id"]
        verbose_name = "tenant"

    def __str__(self) -> str:
        return self.id


class TenantMembership(models.Model):
    """A user's role in a tenant: ``admin`` manages it, ``developer`` builds apps, ``viewer`` reads."""

    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"
        DEVELOPER = "developer", "Developer"
        VIEWER = "viewer", "Viewer"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(default=now, editable=False)

    class Meta:
        db_table = "am_tenant_members"
        verbose_name = "tenant membership"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "tenant"],
                name="uniq_membership_user_tenant",
                violation_error_message="This user is already a member of this tenant.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant_id} ({self.role})"


class Policy(models.Model):
    """A typed gateway rule (rate limit, quota, CORS, IP rules …), attached to APIs or plans (docs/policies.md)."""

    class Type(models.TextChoices):
        RATE_LIMITING = "rate_limiting", "Rate limiting"
        QUOTA = "quota", "Quota"
        CORS = "cors", "CORS (browser cross-origin access)"
        IP_RULES = "ip_rules", "IP rules (allow and deny lists)"
        HEADERS = "headers", "Header transforms"
        REQUEST_LIMITS = "request_limits", "Request limits (methods, body and header size)"
        RESPONSE_CACHE = "response_cache", "Response cache"

    # Types that only make sense for an API's whole traffic: a plan refuses them (services.plan_set_policies).
    API_ONLY_TYPES = (Type.CORS, Type.REQUEST_LIMITS, Type.RESPONSE_CACHE)
    # Types an API has at most one policy of (two CORS answers or two caches would contradict each other).
    SINGLE_PER_API_TYPES = (Type.CORS, Type.REQUEST_LIMITS, Type.RESPONSE_CACHE)

    class Mode(models.TextChoices):
        ENFORCE = "enforce", "Enforce"
        SHADOW = "shadow", "Shadow (count, never block)"

    class OnStoreError(models.TextChoices):
        OPEN = "open", "Open (let traffic through)"
        CLOSED = "closed", "Closed (refuse with 503)"
        LOCAL = "local", "Local (per-worker counters)"

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_policy_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="policies")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    policy_type = models.CharField(max_length=32, choices=Type.choices)
    config = models.JSONField(default=dict)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.ENFORCE)
    on_store_error = models.CharField(
        "on store error", max_length=16, choices=OnStoreError.choices, default=OnStoreError.OPEN
    )
    # The config values a configuration document set from a ${VARIABLE}: {JSON pointer into config: {"reference":
    # the document's text, "digest": an HMAC of the value it stood for}}. Export writes the reference back while the
    # value still matches, so a secret never leaves in clear (apimgmt/config_doc/secrets.py).
    config_references = models.JSONField("variable references", default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(default=now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "am_policies"
        ordering = ["tenant_id", "name"]
        verbose_name = "policy"
        verbose_name_plural = "policies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                name="uniq_policy_tenant_name",
                violation_error_message="A policy with this name already exists in this tenant.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.policy_type})"


class Plan(models.Model):
    """A subscription tier: the policies its subscribers get and whether subscribing needs approval."""

    class Approval(models.TextChoices):
        AUTO = "auto", "Automatic"
        MANUAL = "manual", "Manual (an admin approves)"

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_plan_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="plans")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    policies = models.ManyToManyField(Policy, blank=True, related_name="plans", db_table="am_plan_policies")
    approval = models.CharField(max_length=16, choices=Approval.choices, default=Approval.AUTO)
    websocket_max_connections = models.PositiveIntegerField(
        "WebSocket connections per key",
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(100_000)],
        help_text="Open WebSocket connections one subscriber's key may hold to an API of this plan, across all "
        "gateways; one more gets 429. Empty: the API's own cap.",
    )
    archived_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="Archived: no new subscriptions; existing ones untouched."
    )
    created_at = models.DateTimeField(default=now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "am_plans"
        ordering = ["tenant_id", "name"]
        verbose_name = "plan"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                name="uniq_plan_tenant_name",
                violation_error_message="A plan with this name already exists in this tenant.",
            )
        ]

    def __str__(self) -> str:
        return self.name


def default_jwt_algorithms() -> list[str]:
    return ["RS256"]


class JwtIssuer(models.Model):
    """An identity provider whose signed tokens (JWT) an API accepts instead of, or beside, API keys.

    The gateway checks a token's signature against ``public_keys`` (an inline JWKS) or the JWKS fetched from
    ``jwks_url``, then ``iss``, ``aud``, ``exp`` and ``nbf``, and maps ``consumer_claim`` to a consumer through
    its ``ConsumerIdentity`` for this issuer.
    """

    # The settings an issuer is made of (services, admin, management API and the gateway's snapshot list them so).
    SETTINGS = (
        "name",
        "issuer",
        "audiences",
        "jwks_url",
        "public_keys",
        "algorithms",
        "leeway_seconds",
        "consumer_claim",
        "auto_provision",
        "token_in_query",
    )

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_jwt_issuer_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="jwt_issuers")
    name = models.CharField(max_length=100)
    issuer = models.CharField(max_length=2000, help_text="The token's expected iss claim, e.g. https://id.example.com/")
    audiences = models.JSONField(
        default=list, blank=True, help_text="Accepted aud values; a token must name at least one of them."
    )
    jwks_url = models.CharField(
        "JWKS URL", max_length=2000, blank=True, default="", help_text="Where the signing keys are fetched from."
    )
    public_keys = models.JSONField(
        "public keys (JWKS)", null=True, blank=True, help_text='Inline JWKS: {"keys": [...]}; used instead of a URL.'
    )
    algorithms = models.JSONField(default=default_jwt_algorithms, help_text="Accepted signature algorithms.")
    leeway_seconds = models.PositiveSmallIntegerField(
        "clock leeway", default=30, validators=[MaxValueValidator(300)], help_text="Seconds, for exp and nbf."
    )
    consumer_claim = models.CharField(
        max_length=100, default="sub", help_text="The claim naming the consumer: sub, or azp / client_id."
    )
    auto_provision = models.BooleanField(
        default=False, help_text="A token whose subject maps to no consumer creates one (otherwise 403)."
    )
    token_in_query = models.CharField(
        "token query parameter",
        max_length=64,
        blank=True,
        default="",
        help_text="Query parameter that may carry the token (empty: never).",
    )
    created_at = models.DateTimeField(default=now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "am_jwt_issuers"
        ordering = ["tenant_id", "name"]
        verbose_name = "JWT issuer"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                name="uniq_jwt_issuer_tenant_name",
                violation_error_message="A JWT issuer with this name already exists in this tenant.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.issuer})"


class ApiQuerySet(models.QuerySet["Api"]):
    """The API reads more than one caller needs, written once."""

    def routable(self) -> ApiQuerySet:
        """What the gateway routes (active or deprecated), whatever the tenant's state."""
        return self.filter(status__in=Api.ROUTABLE_STATUSES)

    def public_catalog(self) -> ApiQuerySet:
        """What a portal lists and a developer may read through the management API (``Api.PUBLIC_CATALOG``)."""
        return self.filter(Api.PUBLIC_CATALOG)


class Api(models.Model):
    """An upstream service published through the gateway under ``base_path`` (and optionally a host)."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ACTIVE = "active", "Active"
        DEPRECATED = "deprecated", "Deprecated"
        RETIRED = "retired", "Retired"

    class Visibility(models.TextChoices):
        PUBLIC = "public", "Public (listed in the portal)"
        PRIVATE = "private", "Private (hidden from the portal)"

    class Approval(models.TextChoices):
        AUTO = "auto", "Automatic"
        MANUAL = "manual", "Manual (an admin approves)"

    class AuthMethod(models.TextChoices):
        KEY = "key", "API key"
        JWT = "jwt", "JWT (a token from a listed issuer)"
        KEY_OR_JWT = "key_or_jwt", "API key or JWT"

    class Validation(models.TextChoices):
        OFF = "off", "Off"
        SHADOW = "shadow", "Shadow (log mismatches, never refuse)"
        ENFORCE = "enforce", "Enforce (refuse requests that do not match)"

    ROUTABLE_STATUSES = (Status.ACTIVE, Status.DEPRECATED)
    # The public catalog as a condition, for callers that combine it with others (apimgmt.api.permissions).
    PUBLIC_CATALOG = Q(visibility=Visibility.PUBLIC, status__in=ROUTABLE_STATUSES)

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_api_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="apis")
    api_name = models.CharField("name", max_length=100)
    description = models.TextField(blank=True)
    base_path = models.CharField(max_length=200, help_text="Path prefix, e.g. /api/users/v1")
    host = models.CharField(
        max_length=253, blank=True, default="", help_text="Only route requests for this Host (optional)."
    )
    upstream_url = models.CharField("upstream URL", max_length=2000)
    strip_path = models.BooleanField(default=True, help_text="Remove base_path before forwarding.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    sunset_at = models.DateTimeField(null=True, blank=True, help_text="Announced retirement (Sunset header).")
    # Where the consumer's key is read from.
    key_header = models.CharField(max_length=64, default="X-API-Key")
    accept_bearer = models.BooleanField("accept Authorization: Bearer", default=True)
    key_query_param = models.CharField(
        max_length=64, blank=True, default="", help_text="Query parameter carrying the key (empty: disabled)."
    )
    auth_method = models.CharField("authentication", max_length=16, choices=AuthMethod.choices, default=AuthMethod.KEY)
    jwt_issuers = models.ManyToManyField(
        JwtIssuer,
        blank=True,
        related_name="apis",
        db_table="am_api_jwt_issuers",
        verbose_name="JWT issuers",
        help_text="Issuers whose tokens this API accepts (auth method jwt or key_or_jwt).",
    )
    validation = models.CharField(
        "request validation",
        max_length=16,
        choices=Validation.choices,
        default=Validation.OFF,
        help_text="Check requests against the OpenAPI document.",
    )
    # Upstream behaviour.
    connect_timeout = models.FloatField(
        default=2.0, validators=[MinValueValidator(0.01), MaxValueValidator(60)], help_text="Seconds."
    )
    read_timeout = models.FloatField(
        default=30.0, validators=[MinValueValidator(0.01), MaxValueValidator(3600)], help_text="Seconds."
    )
    total_timeout = models.FloatField(
        default=60.0,
        validators=[MinValueValidator(0.01), MaxValueValidator(3600)],
        help_text="Seconds; deadline for the whole upstream exchange.",
    )
    retries = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(5)])
    cb_failure_threshold = models.PositiveSmallIntegerField(
        "circuit breaker failure threshold", default=5, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    cb_recovery_timeout = models.FloatField(
        "circuit breaker recovery timeout",
        default=30.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Seconds the circuit stays open before one probe request.",
    )
    # WebSocket and long-lived streams (docs/operations.md, "WebSocket and streams").
    websocket = models.BooleanField(
        "WebSocket",
        default=False,
        help_text="Let GET requests with 'Upgrade: websocket' through to the upstream (ws:// or wss://).",
    )
    websocket_max_connections = models.PositiveIntegerField(
        "WebSocket connections per key",
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(100_000)],
        help_text="Open WebSocket connections one key may hold across all gateways; one more gets 429.",
    )
    websocket_idle_timeout = models.FloatField(
        "WebSocket idle timeout",
        default=300.0,
        validators=[MinValueValidator(1), MaxValueValidator(86_400)],
        help_text="Seconds without a frame in either direction before the gateway closes the connection (1008).",
    )
    websocket_max_message_bytes = models.PositiveIntegerField(
        "WebSocket maximum message size",
        default=1_048_576,
        validators=[MinValueValidator(1), MaxValueValidator(64 * 1024 * 1024)],
        help_text="Bytes; a larger message from the client closes its connection (1009).",
    )
    stream_timeout = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(86_400)],
        help_text="Seconds allowed between chunks of a streamed response (text/event-stream, or chunked without a "
        "length); when set it replaces the total timeout for such responses. Empty: they end at the total timeout.",
    )
    visibility = models.CharField(max_length=16, choices=Visibility.choices, default=Visibility.PUBLIC)
    openapi_spec = models.JSONField("OpenAPI document", null=True, blank=True)
    restrict_to_spec = models.BooleanField(
        "restrict to the OpenAPI document",
        default=False,
        help_text="Route only the operations of the OpenAPI document: another path gets 404, another method 405.",
    )
    subscription_approval = models.CharField(max_length=16, choices=Approval.choices, default=Approval.AUTO)
    policies = models.ManyToManyField(Policy, blank=True, related_name="apis", db_table="am_api_policies")
    plans = models.ManyToManyField(
        Plan,
        blank=True,
        related_name="apis",
        db_table="am_api_plans",
        verbose_name="offered plans",
        help_text="The plans developers choose from when subscribing. When any are listed, every new "
        "subscription must name one of them; subscriptions made before keep their plan (or none).",
    )
    created_at = models.DateTimeField(default=now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ApiQuerySet.as_manager()

    class Meta:
        db_table = "am_apis"
        ordering = ["tenant_id", "api_name"]
        verbose_name = "API"
        verbose_name_plural = "APIs"
        indexes = [models.Index(fields=["tenant", "status"], name="idx_apis_tenant_status")]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "base_path"],
                name="uniq_api_host_base_path",
                violation_error_message="Another API already uses this base path on this host.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.api_name} ({self.base_path})"

    @property
    def routable(self) -> bool:
        return self.status in self.ROUTABLE_STATUSES


class UpstreamTarget(models.Model):
    """An extra upstream of an API; traffic is balanced round-robin by weight across all targets."""

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_target_id, editable=False)
    api = models.ForeignKey(Api, on_delete=models.CASCADE, related_name="targets")
    url = models.CharField("URL", max_length=2000)
    weight = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(100)])

    class Meta:
        db_table = "am_upstream_targets"
        ordering = ["api_id", "id"]
        verbose_name = "upstream target"

    def __str__(self) -> str:
        return f"{self.url} (weight {self.weight})"


class Consumer(models.Model):
    """Who calls APIs: an application of a developer (the portal calls it an "app")."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        BLOCKED = "blocked", "Blocked"

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_consumer_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="consumers")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="consumers"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    ip_allow = models.JSONField(
        "allowed addresses", default=list, blank=True, help_text="CIDRs; when any are listed, only they get in."
    )
    ip_deny = models.JSONField("denied addresses", default=list, blank=True, help_text="CIDRs refused.")
    created_at = models.DateTimeField(default=now, editable=False)

    class Meta:
        db_table = "am_consumers"
        ordering = ["tenant_id", "name"]
        verbose_name = "consumer"
        # Names are unique per owner, so one developer's app names neither block nor reveal another's.
        # Apps without an owner (made by an admin) share one namespace per tenant.
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "owner", "name"],
                name="uniq_consumer_owner_name",
                violation_error_message="This owner already has an app with this name.",
            ),
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=Q(owner__isnull=True),
                name="uniq_consumer_unowned_name",
                violation_error_message="An app without an owner already has this name in this tenant.",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ConsumerIdentity(models.Model):
    """Who a consumer is at a JWT issuer: the value of the issuer's consumer claim (``sub`` …) in its tokens."""

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_identity_id, editable=False)
    consumer = models.ForeignKey(Consumer, on_delete=models.CASCADE, related_name="identities")
    issuer = models.ForeignKey(JwtIssuer, on_delete=models.CASCADE, related_name="identities")
    external_id = models.CharField("external ID", max_length=255)
    created_at = models.DateTimeField(default=now, editable=False)

    class Meta:
        db_table = "am_consumer_identities"
        ordering = ["consumer_id", "issuer_id", "external_id"]
        verbose_name = "consumer identity"
        verbose_name_plural = "consumer identities"
        constraints = [
            models.UniqueConstraint(
                fields=["issuer", "external_id"],
                name="uniq_identity_issuer_external_id",
                violation_error_message="Another consumer already has this external ID at this issuer.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.external_id} @ {self.issuer_id} → {self.consumer_id}"


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def live(self, now_: datetime | None = None) -> ApiKeyQuerySet:
        """Keys that work now: not revoked and not expired (the queryset form of ``ApiKey.is_usable``)."""
        moment = now_ or now()
        return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=moment), active=True, revoked_at__isnull=True)


# The default overlap of a key rotation: how long the old key keeps working (admin, portal, management API, services).
DEFAULT_ROTATION_OVERLAP_SECONDS = 3600


class ApiKey(models.Model):
    """A consumer's credential. Only the peppered HMAC of the key is stored; the plaintext is shown once."""

    key_id = models.CharField("key ID", primary_key=True, max_length=32, default=ids.new_key_id, editable=False)
    consumer = models.ForeignKey(Consumer, on_delete=models.CASCADE, related_name="keys")
    name = models.CharField(max_length=100, blank=True, default="")
    key_prefix = models.CharField(max_length=12, editable=False, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    active = models.BooleanField(default=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    rotated_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="successors", editable=False
    )
    ip_allow = models.JSONField(
        "allowed addresses", default=list, blank=True, help_text="CIDRs; when any are listed, only they get in."
    )
    ip_deny = models.JSONField("denied addresses", default=list, blank=True, help_text="CIDRs refused.")
    created_at = models.DateTimeField(default=now, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        db_table = "am_api_keys"
        ordering = ["-created_at"]
        verbose_name = "API key"
        indexes = [
            models.Index(fields=["consumer"], condition=Q(active=True), name="idx_api_keys_consumer_active"),
        ]

    def __str__(self) -> str:
        return f"{self.key_prefix}… ({self.name or self.key_id})"

    def is_usable(self, now_: datetime | None = None) -> bool:
        moment = now_ or now()
        return self.active and self.revoked_at is None and (self.expires_at is None or self.expires_at > moment)


# Pending or active: a consumer has at most one open subscription per API (the constraint below says so too).
OPEN_SUBSCRIPTION_STATUSES = ["pending", "active"]


class SubscriptionQuerySet(models.QuerySet["Subscription"]):
    def open(self) -> SubscriptionQuerySet:
        """Pending or active subscriptions: the ones that hold a consumer's place on an API."""
        return self.filter(status__in=OPEN_SUBSCRIPTION_STATUSES)


class Subscription(models.Model):
    """A consumer's access to an API on a plan; pending ones wait for an admin's decision."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending approval"
        ACTIVE = "active", "Active"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_subscription_id, editable=False)
    consumer = models.ForeignKey(Consumer, on_delete=models.CASCADE, related_name="subscriptions")
    api = models.ForeignKey(Api, on_delete=models.CASCADE, related_name="subscriptions")
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="subscriptions")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=500, blank=True, default="")
    # A plan change waiting for the next quota window (services.subscription_change_plan, effective=next_period).
    pending_plan = models.ForeignKey(
        Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="pending_subscriptions", editable=False
    )
    plan_change_at = models.DateTimeField("plan change takes effect", null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=now, editable=False)

    objects = SubscriptionQuerySet.as_manager()

    class Meta:
        db_table = "am_subscriptions"
        ordering = ["-created_at"]
        verbose_name = "subscription"
        constraints = [
            models.UniqueConstraint(
                fields=["consumer", "api"],
                condition=Q(status__in=OPEN_SUBSCRIPTION_STATUSES),
                name="uniq_open_subscription",
                violation_error_message="This consumer already has a pending or active subscription to this API.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.consumer_id} → {self.api_id} ({self.status})"


# What one row of a usage table counts, unique in each of them (the flusher's upserts conflict on it).
USAGE_BUCKET_KEY = ("tenant", "api_id", "consumer_id", "key_id", "timestamp", "status_code")


class UsageBucket(models.Model):
    """Traffic of one (tenant, API, consumer, key, status code) in one time bucket: what the usage tables share.

    API, consumer and key are plain id columns rather than foreign keys so that
    billing history survives the deletion of what it describes. The tables are
    partitioned by month of ``timestamp`` in PostgreSQL (apimgmt/usage_partitions.py).
    """

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_constraint=True)
    api_id = models.CharField("API ID", max_length=32, blank=True, default="")
    consumer_id = models.CharField("consumer ID", max_length=32, blank=True, default="")
    key_id = models.CharField("key ID", max_length=32, blank=True, default="")
    timestamp = models.DateTimeField(
        help_text="Start of the bucket: the minute, the UTC hour, or the tenant's local midnight (daily)."
    )
    status_code = models.PositiveSmallIntegerField()
    request_count = models.BigIntegerField(default=0)
    error_count = models.BigIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    latency_ms_max = models.FloatField(default=0)
    upstream_latency_ms_sum = models.FloatField(default=0)
    # WebSocket connections (status 101 rows; their messages' bytes are in bytes_in and bytes_out).
    connection_count = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket connections opened.")
    connection_seconds = models.FloatField(default=0, db_default=0, help_text="Time WebSocket connections were open.")
    messages_in = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket messages from clients.")
    messages_out = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket messages to clients.")

    class Meta:
        abstract = True
        ordering = ["-timestamp"]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.api_id} {self.timestamp:%Y-%m-%d %H:%M} {self.status_code}"


class UsageRecord(UsageBucket):
    """Aggregated traffic: one row per minute per (tenant, API, consumer, key, status code)."""

    class Meta(UsageBucket.Meta):
        db_table = "am_usage_records"
        verbose_name = "usage record"
        indexes = [
            models.Index(fields=["tenant", "-timestamp"], name="idx_usage_records_tenant_time"),
        ]
        constraints = [
            models.UniqueConstraint(fields=USAGE_BUCKET_KEY, name="uniq_usage_bucket"),
        ]


class UsageHourly(UsageBucket):
    """The minute rows summed per UTC hour (``timestamp`` is the hour's start); kept by the flusher."""

    class Meta(UsageBucket.Meta):
        db_table = "am_usage_hourly"
        verbose_name = "hourly usage"
        verbose_name_plural = "hourly usage"
        indexes = [models.Index(fields=["tenant", "-timestamp"], name="idx_usage_hourly_tenant_time")]
        constraints = [
            models.UniqueConstraint(fields=USAGE_BUCKET_KEY, name="uniq_usage_hourly_bucket"),
        ]


class UsageDaily(UsageBucket):
    """The minute rows summed per calendar day in the tenant's time zone (``timestamp``: that day's local midnight)."""

    class Meta(UsageBucket.Meta):
        db_table = "am_usage_daily"
        verbose_name = "daily usage"
        verbose_name_plural = "daily usage"
        indexes = [
            models.Index(fields=["tenant", "-timestamp"], name="idx_usage_daily_tenant_time"),
            models.Index(fields=["tenant", "consumer_id", "-timestamp"], name="idx_usage_daily_consumer"),
        ]
        constraints = [
            models.UniqueConstraint(fields=USAGE_BUCKET_KEY, name="uniq_usage_daily_bucket"),
        ]


class AuditEvent(models.Model):
    """Who changed what, when, from where. Written by every service; never edited."""

    id = models.BigAutoField(primary_key=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_repr = models.CharField("actor", max_length=150, blank=True, default="")
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    changes = models.JSONField(default=dict, blank=True)
    request_id = models.CharField(max_length=128, blank=True, default="")
    ip = models.GenericIPAddressField("IP", null=True, blank=True)
    at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        db_table = "am_audit_events"
        ordering = ["-at", "-id"]
        verbose_name = "audit event"
        indexes = [models.Index(fields=["tenant", "-at"], name="idx_audit_tenant_at")]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type} {self.object_id}"


class ApiToken(models.Model):
    """A management API token (``Authorization: Token <token>``). Only its SHA-256 is stored."""

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, default="")
    token_prefix = models.CharField(max_length=12, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        db_table = "am_api_tokens"
        ordering = ["-created_at"]
        verbose_name = "management API token"

    def __str__(self) -> str:
        return f"{self.token_prefix}… ({self.user})"


# The same for the totals tables: one row per (tenant, dimension, value, bucket start, status code).
USAGE_TOTAL_KEY = ("tenant", "dimension", "value", "timestamp", "status_code")


class UsageTotal(models.Model):
    """Traffic of a whole tenant, one of its APIs or one of its consumers in one time bucket, per status code.

    ``dimension`` says which (``tenant``, ``api``, ``consumer``) and ``value`` which one (empty for the tenant).
    Kept by the flusher beside the per-key rollups so tenant-wide pages read a few rows per bucket, not one per key.
    """

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_constraint=True)
    dimension = models.CharField(max_length=16)
    value = models.CharField(max_length=32, blank=True, default="")
    timestamp = models.DateTimeField(help_text="Start of the bucket: the UTC hour, or the tenant's local midnight.")
    status_code = models.PositiveSmallIntegerField()
    request_count = models.BigIntegerField(default=0)
    error_count = models.BigIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    latency_ms_max = models.FloatField(default=0)
    upstream_latency_ms_sum = models.FloatField(default=0)
    # WebSocket connections (status 101 rows; their messages' bytes are in bytes_in and bytes_out).
    connection_count = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket connections opened.")
    connection_seconds = models.FloatField(default=0, db_default=0, help_text="Time WebSocket connections were open.")
    messages_in = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket messages from clients.")
    messages_out = models.BigIntegerField(default=0, db_default=0, help_text="WebSocket messages to clients.")

    class Meta:
        abstract = True
        ordering = ["-timestamp"]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.dimension}={self.value} {self.timestamp:%Y-%m-%d %H:%M} {self.status_code}"


class UsageHourlyTotal(UsageTotal):
    """Per UTC hour: the tenant, each API and each consumer (the admin overview, GET usage/ by hour)."""

    class Meta(UsageTotal.Meta):
        db_table = "am_usage_hourly_totals"
        verbose_name = "hourly usage total"
        indexes = [models.Index(fields=["tenant", "dimension", "-timestamp"], name="idx_usage_hourly_totals_time")]
        constraints = [
            models.UniqueConstraint(fields=USAGE_TOTAL_KEY, name="uniq_usage_hourly_total"),
        ]


class UsageDailyTotal(UsageTotal):
    """Per day in the tenant's time zone: the tenant, each API and each consumer (GET usage/ by day)."""

    class Meta(UsageTotal.Meta):
        db_table = "am_usage_daily_totals"
        verbose_name = "daily usage total"
        indexes = [models.Index(fields=["tenant", "dimension", "-timestamp"], name="idx_usage_daily_totals_time")]
        constraints = [
            models.UniqueConstraint(fields=USAGE_TOTAL_KEY, name="uniq_usage_daily_total"),
        ]


class UsageCopy(models.Model):
    """A claimed minute of Redis usage buckets the flusher added to the usage tables (the claim's token).

    Recorded in the same transaction as the rows, so a claim copied before (a flusher died after its commit, or
    two flushers raced) is recognised and skipped: exactly once, with one row per copied tenant-minute, not per
    request. Forgotten after two days (a claim lives seconds).
    """

    token = models.CharField(max_length=64, primary_key=True)
    tenant_id = models.CharField("tenant ID", max_length=63)
    minute = models.DateTimeField()
    copied_at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        db_table = "am_usage_copies"
        verbose_name = "copied usage minute"

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.minute:%Y-%m-%d %H:%M} ({self.token})"


class Event(models.Model):
    """Something that happened in a tenant (``key.revoked``, ``subscription.plan_changed`` …): the outbox.

    Written by the services in the transaction of the change it describes, so a change and its event commit or
    roll back together; ``manage.py deliver_events`` fans it out to the tenant's webhook endpoints. ``dedupe_key``
    (unique) makes a notice that several processes may decide to send, such as ``key.expiring``, exist once.
    """

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_event_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    event_type = models.CharField(max_length=64)
    data = models.JSONField(default=dict)
    occurred_at = models.DateTimeField(default=now)
    dedupe_key = models.CharField(max_length=200, null=True, blank=True, unique=True, editable=False)
    dispatched_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When deliveries to the matching endpoints were queued."
    )

    class Meta:
        db_table = "am_events"
        ordering = ["-occurred_at", "-id"]
        verbose_name = "event"
        indexes = [
            models.Index(fields=["tenant", "-occurred_at"], name="idx_events_tenant_time"),
            models.Index(
                fields=["occurred_at"], condition=Q(dispatched_at__isnull=True), name="idx_events_undispatched"
            ),
            # The deliverer reads the recent plan changes every few seconds (their quota carry-over's second pass).
            models.Index(
                fields=["occurred_at"],
                condition=Q(event_type="subscription.plan_changed"),
                name="idx_events_plan_changes",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.id}"


class WebhookEndpoint(models.Model):
    """A tenant's receiver of events: a URL, the event types it wants and the secret its requests are signed with.

    The secret (``whsec_`` + base64) must be kept to sign, so it is stored as is; it is shown once, when created or
    rotated. After a rotation the previous secret also signs until ``previous_secret_expires_at``.
    """

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        DISABLED = "disabled", "Disabled"

    id = models.CharField("ID", primary_key=True, max_length=32, default=ids.new_webhook_endpoint_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.CharField("URL", max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    event_types = models.JSONField(default=list, blank=True, help_text="Event types sent here; empty: every type.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    disabled_reason = models.CharField(max_length=500, blank=True, default="", editable=False)
    secret = models.CharField(max_length=100, editable=False)
    previous_secret = models.CharField(max_length=100, blank=True, default="", editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    failing_since = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="First failed attempt since the last success."
    )
    created_at = models.DateTimeField(default=now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "am_webhook_endpoints"
        ordering = ["tenant_id", "url"]
        verbose_name = "webhook endpoint"

    def __str__(self) -> str:
        return self.url

    def wants(self, event_type: str) -> bool:
        return not self.event_types or event_type in self.event_types


class WebhookDelivery(models.Model):
    """One event sent (or to be sent) to one endpoint: status, attempts, the last answer and its latency."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    id = models.BigAutoField(primary_key=True)
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.FloatField("latency (ms)", null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    replay_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays")
    created_at = models.DateTimeField(default=now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "am_webhook_deliveries"
        ordering = ["-created_at", "-id"]
        verbose_name = "webhook delivery"
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="idx_deliveries_due"),
            models.Index(fields=["endpoint", "-created_at"], name="idx_deliveries_endpoint_time"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} → {self.endpoint_id} ({self.status})"
