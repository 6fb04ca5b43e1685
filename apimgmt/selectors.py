"""Reads that more than one caller needs: tenant visibility for users, and the gateway's snapshots.

The gateway never touches the ORM on a warm request; it calls these to (re)build
its in-memory tables and caches, and they return plain data (no model objects)
so a snapshot can be cached in Redis as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db.models import Case, F, JSONField, Q, QuerySet, Value, When
from django.db.models.fields.json import KeyTransform

from apimgmt.models import (
    Api,
    ApiKey,
    Consumer,
    ConsumerIdentity,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    TenantMembership,
    UpstreamTarget,
)

# ---------------------------------------------------------------------------
# Who sees what
# ---------------------------------------------------------------------------


def is_platform_staff(user: AbstractBaseUser | AnonymousUser) -> bool:
    return bool(getattr(user, "is_superuser", False))


def tenant_ids_for_user(user: AbstractBaseUser | AnonymousUser, roles: tuple[str, ...] | None = None) -> list[str]:
    """Tenants the user is a member of (optionally only with one of ``roles``)."""
    if not user.is_authenticated:
        return []
    qs = TenantMembership.objects.filter(user_id=user.pk)
    if roles:
        qs = qs.filter(role__in=roles)
    return list(qs.values_list("tenant_id", flat=True))


def user_role(user: AbstractBaseUser | AnonymousUser, tenant_id: str) -> str | None:
    if not user.is_authenticated:
        return None
    return TenantMembership.objects.filter(user_id=user.pk, tenant_id=tenant_id).values_list("role", flat=True).first()


def tenants_visible_to(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Tenant]:
    if is_platform_staff(user):
        return Tenant.objects.all()
    return Tenant.objects.filter(id__in=tenant_ids_for_user(user))


def portal_catalog(tenant: Tenant) -> QuerySet[Api]:
    """APIs a tenant's portal lists: public, active or deprecated."""
    return tenant.apis.public_catalog().order_by("api_name")


# ---------------------------------------------------------------------------
# Gateway snapshots
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    id: str
    name: str
    policy_type: str
    config: dict[str, Any]
    mode: str
    on_store_error: str


@dataclass(frozen=True)
class IssuerSpec:
    """A JWT issuer an API accepts (apimgmt.models.JwtIssuer), as the gateway verifies tokens against it."""

    id: str
    tenant_id: str
    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str
    public_keys: dict[str, Any] | None
    algorithms: tuple[str, ...]
    leeway_seconds: int
    consumer_claim: str
    auto_provision: bool
    token_in_query: str


@dataclass(frozen=True)
class RouteSpec:
    """What the gateway needs to route and proxy one API."""

    api_id: str
    tenant_id: str
    tenant_timezone: str
    api_name: str
    base_path: str
    host: str
    status: str
    sunset_at: str | None
    strip_path: bool
    targets: list[tuple[str, int]]  # (url, weight); the first is upstream_url
    key_header: str
    accept_bearer: bool
    key_query_param: str
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    retries: int
    cb_failure_threshold: int
    cb_recovery_timeout: float
    # WebSocket and streams (gateway/websocket.py, gateway/streams.py).
    websocket: bool = False
    websocket_max_connections: int = 10
    websocket_idle_timeout: float = 300.0
    websocket_max_message_bytes: int = 1_048_576
    stream_timeout: float | None = None
    # restrict_to_spec: the OpenAPI document's paths, which alone are routed (apimgmt/spec_operations.py).
    spec_paths: dict[str, Any] | None = None
    # Request validation (validation shadow or enforce): the whole OpenAPI document, compiled once per route table
    # by gateway/request_validation.py.
    openapi_spec: dict[str, Any] | None = None
    policies: list[PolicySpec] = field(default_factory=list)
    # Authentication (apimgmt.models.Api.AuthMethod) and the issuers whose tokens are accepted, in name order.
    auth_method: str = "key"
    jwt_issuers: tuple[IssuerSpec, ...] = ()
    # Request validation against the OpenAPI document: off, shadow or enforce.
    validation: str = "off"
    # WebSocket APIs only: the caps of the tenant's plans that set their own (plan id -> open connections per key);
    # the key's plan for this API wins over websocket_max_connections.
    websocket_plan_caps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteSnapshot:
    routes: list[RouteSpec]
    plan_policies: dict[str, list[PolicySpec]]
    plan_tenants: dict[str, str] = field(default_factory=dict)  # plan id -> its tenant (the gateway's chains)


def _policy_spec(policy: Policy) -> PolicySpec:
    return PolicySpec(
        id=policy.id,
        name=policy.name,
        policy_type=policy.policy_type,
        config=dict(policy.config),
        mode=policy.mode,
        on_store_error=policy.on_store_error,
    )


_ROUTE_COLUMNS = (
    "id",
    "tenant_id",
    "tenant__timezone",
    "api_name",
    "base_path",
    "host",
    "status",
    "sunset_at",
    "strip_path",
    "upstream_url",
    "key_header",
    "accept_bearer",
    "key_query_param",
    "connect_timeout",
    "read_timeout",
    "total_timeout",
    "retries",
    "cb_failure_threshold",
    "cb_recovery_timeout",
    "websocket",
    "websocket_max_connections",
    "websocket_idle_timeout",
    "websocket_max_message_bytes",
    "stream_timeout",
    "auth_method",
    "validation",
)
_POLICY_COLUMNS = ("id", "name", "policy_type", "config", "mode", "on_store_error")
_ISSUER_COLUMNS = ("id", "tenant_id", *JwtIssuer.SETTINGS)


def issuer_spec(issuer: JwtIssuer) -> IssuerSpec:
    """One issuer as the gateway sees it (for callers holding a model instance)."""
    return _issuer_spec_from_row(tuple(getattr(issuer, column) for column in _ISSUER_COLUMNS))


def _issuer_spec_from_row(row: tuple[Any, ...]) -> IssuerSpec:
    values = dict(zip(_ISSUER_COLUMNS, row, strict=True))
    values["audiences"] = tuple(values["audiences"] or ())
    values["algorithms"] = tuple(values["algorithms"] or ())
    return IssuerSpec(**values)


def route_snapshot() -> RouteSnapshot:
    """Every routable API of every active tenant, with its targets and policies, and every plan's policies.

    Plain rows, five queries whatever the size: model instances and prefetch managers made a 10,000-API snapshot
    take about ten times longer (make bench-scale), and every gateway worker builds one on each route change.
    """
    routable = Api.objects.routable().filter(tenant__status=Tenant.Status.ACTIVE)
    targets: dict[str, list[tuple[str, int]]] = {}
    for api_id, url, weight in (
        UpstreamTarget.objects.filter(api__in=routable.values("id"))
        .order_by("api_id", "id")
        .values_list("api_id", "url", "weight")
    ):
        targets.setdefault(api_id, []).append((url, weight))
    # Each policy once (shared by the APIs that use it), in the model's order (tenant, name) per API.
    policies: dict[str, PolicySpec] = {}
    by_api: dict[str, list[PolicySpec]] = {}
    link = Api.policies.through
    for row in (
        link.objects.filter(api__in=routable.values("id"))
        .order_by("policy__tenant_id", "policy__name")
        .values_list("api_id", *(f"policy__{c}" for c in _POLICY_COLUMNS))
    ):
        spec = policies.get(row[1])
        if spec is None:
            spec = policies[row[1]] = PolicySpec(*row[1:])
        by_api.setdefault(row[0], []).append(spec)
    # Each issuer once too, in name order per API.
    issuers: dict[str, IssuerSpec] = {}
    issuers_by_api: dict[str, list[IssuerSpec]] = {}
    issuer_link = Api.jwt_issuers.through
    for row in (
        issuer_link.objects.filter(api__in=routable.values("id"))
        .order_by("jwtissuer__name", "jwtissuer_id")
        .values_list("api_id", *(f"jwtissuer__{c}" for c in _ISSUER_COLUMNS))
    ):
        issuer = issuers.get(row[1])
        if issuer is None:
            issuer = issuers[row[1]] = _issuer_spec_from_row(row[1:])
        issuers_by_api.setdefault(row[0], []).append(issuer)
    routes = [
        RouteSpec(
            api_id=api_id,
            tenant_id=tenant_id,
            tenant_timezone=timezone,
            api_name=api_name,
            base_path=base_path,
            host=host,
            status=status,
            sunset_at=sunset_at.isoformat() if sunset_at else None,
            strip_path=strip_path,
            targets=[(upstream_url, 1), *targets.get(api_id, ())],
            key_header=key_header,
            accept_bearer=accept_bearer,
            key_query_param=key_query_param,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            total_timeout=total_timeout,
            retries=retries,
            cb_failure_threshold=cb_failure_threshold,
            cb_recovery_timeout=cb_recovery_timeout,
            websocket=websocket,
            websocket_max_connections=websocket_max_connections,
            websocket_idle_timeout=websocket_idle_timeout,
            websocket_max_message_bytes=websocket_max_message_bytes,
            stream_timeout=stream_timeout,
            spec_paths=spec_paths if isinstance(spec_paths, dict) else None,
            openapi_spec=validated_spec if isinstance(validated_spec, dict) else None,
            policies=by_api.get(api_id, []),
            auth_method=auth_method,
            jwt_issuers=tuple(issuers_by_api.get(api_id, ())),
            validation=validation,
        )
        for (
            api_id,
            tenant_id,
            timezone,
            api_name,
            base_path,
            host,
            status,
            sunset_at,
            strip_path,
            upstream_url,
            key_header,
            accept_bearer,
            key_query_param,
            connect_timeout,
            read_timeout,
            total_timeout,
            retries,
            cb_failure_threshold,
            cb_recovery_timeout,
            websocket,
            websocket_max_connections,
            websocket_idle_timeout,
            websocket_max_message_bytes,
            stream_timeout,
            auth_method,
            validation,
            spec_paths,
            validated_spec,
        ) in routable.order_by("tenant_id", "api_name")
        # Only restricted APIs bring their paths (documents can be large), in the same query.
        .annotate(
            spec_paths=Case(
                When(restrict_to_spec=True, then=KeyTransform("paths", "openapi_spec")),
                default=Value(None),
                output_field=JSONField(),
            ),
            # APIs that validate requests bring their whole document (schemas, components).
            validated_spec=Case(
                When(~Q(validation="off"), then=F("openapi_spec")), default=Value(None), output_field=JSONField()
            ),
        )
        .values_list(*_ROUTE_COLUMNS, "spec_paths", "validated_spec")
    ]
    plans = list(Plan.objects.filter(tenant__status=Tenant.Status.ACTIVE).prefetch_related("policies"))
    plan_policies = {plan.id: [_policy_spec(p) for p in plan.policies.all()] for plan in plans}
    # Plans' own WebSocket connection caps, to each WebSocket API of their tenant (from the same rows).
    caps: dict[str, dict[str, int]] = {}
    for plan in plans:
        if plan.websocket_max_connections is not None:
            caps.setdefault(plan.tenant_id, {})[plan.id] = plan.websocket_max_connections
    if caps:
        routes = [
            replace(spec, websocket_plan_caps=caps[spec.tenant_id])
            if spec.websocket and spec.tenant_id in caps
            else spec
            for spec in routes
        ]
    return RouteSnapshot(
        routes=routes, plan_policies=plan_policies, plan_tenants={plan.id: plan.tenant_id for plan in plans}
    )


@dataclass(frozen=True)
class KeyRecord:
    """A key's state as the gateway sees it; JSON-serialisable for the Redis cache."""

    key_id: str
    key_prefix: str
    consumer_id: str
    tenant_id: str
    active: bool
    revoked: bool
    expires_at: float | None  # POSIX seconds
    consumer_active: bool
    subscriptions: dict[str, str]  # api_id -> plan_id ("" when none), active subscriptions only
    last_used_at: float | None = None
    # IP rules of the consumer and of the key (CIDRs): deny wins; a non-empty allow list refuses everything else.
    consumer_ip_allow: tuple[str, ...] = ()
    consumer_ip_deny: tuple[str, ...] = ()
    key_ip_allow: tuple[str, ...] = ()
    key_ip_deny: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        """A record from its JSON form; one cached before a field existed gets the field's default, and a field
        this version does not know (written by a newer control plane) is left out."""
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        for name in _IP_LIST_FIELDS:
            if name in values:
                values[name] = tuple(values[name] or ())
        return cls(**values)


_IP_LIST_FIELDS = ("consumer_ip_allow", "consumer_ip_deny", "key_ip_allow", "key_ip_deny")


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def key_record_by_hash(key_hash: str) -> KeyRecord | None:
    """The key with this hash and what it may access, or None. Two indexed queries."""
    key = ApiKey.objects.select_related("consumer").filter(key_hash=key_hash).first()
    if key is None:
        return None
    subscriptions = dict(
        Subscription.objects.filter(consumer_id=key.consumer_id, status=Subscription.Status.ACTIVE).values_list(
            "api_id", "plan_id"
        )
    )
    return KeyRecord(
        key_id=key.key_id,
        key_prefix=key.key_prefix,
        consumer_id=key.consumer_id,
        tenant_id=key.consumer.tenant_id,
        active=key.active,
        revoked=key.revoked_at is not None,
        expires_at=_ts(key.expires_at),
        consumer_active=key.consumer.status == Consumer.Status.ACTIVE,
        subscriptions={api_id: plan_id or "" for api_id, plan_id in subscriptions.items()},
        last_used_at=_ts(key.last_used_at),
        consumer_ip_allow=tuple(key.consumer.ip_allow or ()),
        consumer_ip_deny=tuple(key.consumer.ip_deny or ()),
        key_ip_allow=tuple(key.ip_allow or ()),
        key_ip_deny=tuple(key.ip_deny or ()),
    )


def identity_record(issuer_id: str, external_id: str) -> KeyRecord | None:
    """The consumer a JWT identity (issuer, consumer claim value) acts as, in the form of a key's record, or None.
    Two indexed queries. There is no key: ``key_id`` is the identity's id (``cid_…``), so limits scoped per key
    count each identity apart and usage names it; ``key_prefix`` and the key's own IP lists are empty.

    The gateway caches it under ``apimgmt.invalidation.identity_cache_hash``, which the control plane evicts when
    the identity, its consumer or the consumer's subscriptions change."""
    identity = (
        ConsumerIdentity.objects.select_related("consumer").filter(issuer_id=issuer_id, external_id=external_id).first()
    )
    if identity is None:
        return None
    consumer = identity.consumer
    subscriptions = Subscription.objects.filter(consumer_id=consumer.pk, status=Subscription.Status.ACTIVE).values_list(
        "api_id", "plan_id"
    )
    return KeyRecord(
        key_id=identity.pk,
        key_prefix="",
        consumer_id=consumer.pk,
        tenant_id=consumer.tenant_id,
        active=True,
        revoked=False,
        expires_at=None,
        consumer_active=consumer.status == Consumer.Status.ACTIVE,
        subscriptions={api_id: plan_id or "" for api_id, plan_id in subscriptions},
        consumer_ip_allow=tuple(consumer.ip_allow or ()),
        consumer_ip_deny=tuple(consumer.ip_deny or ()),
    )
