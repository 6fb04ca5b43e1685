"""Who may see and change what in the management API: every queryset passes through ``restrict`` (one place)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db.models import Model, Q, QuerySet

from apimgmt.models import (
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
    TenantMembership,
    UsageDaily,
    UsageHourly,
    UsageRecord,
    WebhookDelivery,
    WebhookEndpoint,
)
from apimgmt.selectors import is_platform_staff

M = TypeVar("M", bound=Model)
User = AbstractBaseUser | AnonymousUser

# Actions a caller can take on a row.
VIEW = "view"
CHANGE = "change"  # update, delete, revoke, rotate, cancel, block
DECIDE = "decide"  # approve or reject a subscription: tenant admins only
STAFF = "staff"  # suspend or activate a tenant: platform staff only

ADMIN = TenantMembership.Role.ADMIN
DEVELOPER = TenantMembership.Role.DEVELOPER
VIEWER = TenantMembership.Role.VIEWER


@dataclass(frozen=True)
class TenantScope:
    """How a model's rows belong to a tenant and, for developer-managed rows, to a user."""

    tenant_path: str
    # Rows a developer owns (their consumers and what hangs off them); None: developers own none.
    owned: Callable[[Any], Q] | None = None
    # What a developer may read: the tenant's rows ("tenant", the catalog), only owned rows, or nothing.
    developer_reads: str = "tenant"
    developer_actions: frozenset[str] = field(default_factory=frozenset)
    # Narrows what a developer reads at tenant level (APIs: only the public catalog).
    developer_filter: Q | None = None


def _owned_consumers(user_id: Any) -> Q:
    return Q(owner_id=user_id)


def _owned_via_consumer(user_id: Any) -> Q:
    return Q(consumer__owner_id=user_id)


def _owned_usage(user_id: Any) -> Q:
    return Q(consumer_id__in=Consumer.objects.filter(owner_id=user_id).values("id"))


SCOPES: dict[type[Model], TenantScope] = {
    Tenant: TenantScope("id"),
    # Developers read the catalog the portal shows: public APIs that route. Private and draft APIs (and their
    # internal upstream addresses) stay with the tenant's admins and viewers.
    Api: TenantScope(
        "tenant_id",
        developer_filter=Api.PUBLIC_CATALOG,
    ),
    Plan: TenantScope("tenant_id"),
    Policy: TenantScope("tenant_id"),
    # Developers read a tenant's issuers (they need the issuer and audience to get a token); admins manage them.
    JwtIssuer: TenantScope("tenant_id"),
    # Identities decide whose tokens act as a consumer: developers read their own consumers', never change them.
    ConsumerIdentity: TenantScope("consumer__tenant_id", _owned_via_consumer, "owned"),
    Consumer: TenantScope("tenant_id", _owned_consumers, "owned", frozenset({CHANGE})),
    ApiKey: TenantScope("consumer__tenant_id", _owned_via_consumer, "owned", frozenset({CHANGE})),
    Subscription: TenantScope("consumer__tenant_id", _owned_via_consumer, "owned", frozenset({CHANGE})),
    UsageRecord: TenantScope("tenant_id", _owned_usage, "owned"),
    UsageHourly: TenantScope("tenant_id", _owned_usage, "owned"),
    UsageDaily: TenantScope("tenant_id", _owned_usage, "owned"),
    AuditEvent: TenantScope("tenant_id", developer_reads="none"),
    # Webhooks are the tenant's integration with its own systems: admins manage them, viewers read them.
    WebhookEndpoint: TenantScope("tenant_id", developer_reads="none"),
    WebhookDelivery: TenantScope("endpoint__tenant_id", developer_reads="none"),
}

# Models a developer may create in their tenant (keys and subscriptions are checked through their consumer).
DEVELOPER_CREATES: frozenset[type[Model]] = frozenset({Consumer})


def roles_of(user: User) -> dict[str, str]:
    """{tenant_id: role} for the user, read once per request object."""
    if not user.is_authenticated:
        return {}
    memo = vars(user)
    cached: dict[str, str] | None = memo.get("_apimgmt_roles")
    if cached is None:
        cached = dict(TenantMembership.objects.filter(user_id=user.pk).values_list("tenant_id", "role"))
        memo["_apimgmt_roles"] = cached
    return cached


def restrict(queryset: QuerySet[M], user: User, action: str) -> QuerySet[M]:
    """The rows of ``queryset`` the user may take ``action`` on. Staff: all; members: by role; others: none."""
    if not user.is_authenticated:
        return queryset.none()
    if is_platform_staff(user):
        return queryset
    if action == STAFF:
        return queryset.none()
    scope = SCOPES[queryset.model]
    by_role: dict[str, list[str]] = {}
    for tenant_id, role in roles_of(user).items():
        by_role.setdefault(role, []).append(tenant_id)

    def in_tenants(role: str) -> Q:
        return Q(**{f"{scope.tenant_path}__in": by_role[role]})

    allowed = Q(pk__in=[])
    if ADMIN in by_role:
        allowed |= in_tenants(ADMIN)
    if VIEWER in by_role and action == VIEW:
        allowed |= in_tenants(VIEWER)
    if DEVELOPER in by_role:
        if action == VIEW and scope.developer_reads == "tenant":
            allowed |= in_tenants(DEVELOPER) & (scope.developer_filter or Q())
        elif scope.owned is not None and (
            (action == VIEW and scope.developer_reads == "owned") or action in scope.developer_actions
        ):
            allowed |= in_tenants(DEVELOPER) & scope.owned(user.pk)
    return queryset.filter(allowed)


def may_create(user: User, model: type[Model], tenant_id: str) -> bool:
    """Whether the user may create a ``model`` row in the tenant (its visibility is checked separately)."""
    if is_platform_staff(user):
        return True
    if model is Tenant:
        return False
    role = roles_of(user).get(tenant_id)
    return role == ADMIN or (role == DEVELOPER and model in DEVELOPER_CREATES)


def sees_internals(user: User, tenant_id: str) -> bool:
    """Whether the user sees a tenant's infrastructure (upstreams, targets, key settings): staff, admins, viewers.

    Developers read the catalog only: what to call and its documentation, never where the traffic goes.
    """
    if is_platform_staff(user):
        return True
    return roles_of(user).get(tenant_id) in (ADMIN, VIEWER)


def may_act_on(user: User, obj: Model, action: str) -> bool:
    """Whether ``action`` is allowed on this (already visible) object."""
    model = type(obj)
    return restrict(model._default_manager.filter(pk=obj.pk), user, action).exists()
