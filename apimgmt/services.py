"""Every write to the domain: typed, keyword-only, transactional, each leaving an AuditEvent.

The admin, the management API and the portal all call these, so a key created
in any of them is the same key. Bad input raises ``ValidationError`` with a
message that says what to fix; nothing half-written is left behind.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db import DatabaseError, IntegrityError, models, transaction
from django.utils import timezone

from apimgmt import events, ids, keys, limits, validation
from apimgmt.context import client_ip_var, request_id_var
from apimgmt.invalidation import config_changed, consumer_changed, identities_changed, keys_changed
from apimgmt.models import (
    DEFAULT_ROTATION_OVERLAP_SECONDS,
    OPEN_SUBSCRIPTION_STATUSES,
    Api,
    ApiKey,
    AuditEvent,
    Consumer,
    ConsumerIdentity,
    Event,
    JwtIssuer,
    Plan,
    Policy,
    Subscription,
    Tenant,
    TenantMembership,
    UpstreamTarget,
)

Actor = AbstractBaseUser | AnonymousUser | None

MAX_OVERLAP_SECONDS = 30 * 86400
_Deletable = TypeVar("_Deletable", Api, Plan, Policy, JwtIssuer)


class DeletionRefused(Exception):
    """A delete that would take something still in use with it; the message says what to do first."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, models.Model):
        return str(value.pk)
    if isinstance(value, (list, tuple, set)):
        return [_json_value(v) for v in value]
    return value


def audit_record(
    *,
    actor: Actor,
    tenant_id: str | None,
    action: str,
    obj: models.Model,
    changes: dict[str, Any] | None = None,
) -> AuditEvent:
    user = actor if isinstance(actor, User) and actor.pk else None
    return AuditEvent.objects.create(
        actor=user,
        actor_repr=user.get_username() if user else "system",
        tenant_id=tenant_id,
        action=action,
        object_type=obj._meta.model_name or type(obj).__name__.lower(),
        object_id=str(obj.pk),
        changes={k: _json_value(v) for k, v in (changes or {}).items()},
        request_id=request_id_var.get() or "",
        ip=client_ip_var.get(),
    )


def _save_validated(obj: models.Model, *, exclude: Sequence[str] = ()) -> None:
    """full_clean (fields, validators, constraints) then save; IntegrityError becomes a ValidationError."""
    obj.full_clean(exclude=list(exclude) or None)
    try:
        with transaction.atomic():
            obj.save()
    except IntegrityError as exc:
        # A race past full_clean's checks; don't echo database internals to the caller.
        raise ValidationError("This change conflicts with a record that was just created or changed; retry.") from exc


def _apply(obj: models.Model, fields: dict[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    """Set the allowed fields on obj and return {field: [old, new]} for those that changed."""
    allowed_set = set(allowed)
    unknown = sorted(set(fields) - allowed_set)
    if unknown:
        raise ValidationError({name: "This field cannot be changed here." for name in unknown})
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        old = getattr(obj, name)
        if old != value:
            setattr(obj, name, value)
            changes[name] = [_json_value(old), _json_value(value)]
    return changes


def _field_error(field: str, exc: ValidationError) -> ValidationError:
    return ValidationError({field: exc.messages})


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _named(names: Sequence[str], noun: str, plural: str | None = None, *, limit: int = 5) -> str:
    """'2 APIs (orders, users)'; past ``limit`` names, 'and N more'."""
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{_count(len(names), noun, plural)} ({shown})"


def _delete_unless_refused(
    obj: _Deletable, *, refusal: Callable[[_Deletable], str | None], action: str, changes: dict[str, Any], actor: Actor
) -> None:
    """Delete ``obj`` (audited, gateways told) unless ``refusal`` names a reason, which is raised as DeletionRefused.

    Call inside a transaction with ``obj`` fetched ``select_for_update()``: an activate, subscribe or attach that
    races the delete (its foreign-key check locks the same row) waits, then sees the status or finds the row gone.
    """
    reason = refusal(obj)
    if reason:
        raise DeletionRefused(reason)
    audit_record(actor=actor, tenant_id=obj.tenant_id, action=action, obj=obj, changes=changes)
    obj.delete()
    config_changed()


# ---------------------------------------------------------------------------
# Tenants
# ---------------------------------------------------------------------------


@transaction.atomic
def tenant_create(*, id: str, name: str, actor: Actor, timezone_name: str = "UTC", open_signup: bool = False) -> Tenant:
    if Tenant.objects.filter(pk=id).exists():
        raise ValidationError({"id": f"A tenant with id {id!r} already exists."})
    try:
        validation.validate_timezone(timezone_name)
    except ValidationError as exc:
        raise _field_error("timezone", exc) from exc
    tenant = Tenant(id=id, name=name, timezone=timezone_name, open_signup=open_signup)
    tenant.full_clean(validate_unique=False)
    tenant.save(force_insert=True)
    audit_record(actor=actor, tenant_id=tenant.id, action="tenant.create", obj=tenant, changes={"name": name})
    return tenant


@transaction.atomic
def tenant_update(*, tenant: Tenant, actor: Actor, **fields: Any) -> Tenant:
    if "timezone" in fields:
        try:
            validation.validate_timezone(fields["timezone"])
        except ValidationError as exc:
            raise _field_error("timezone", exc) from exc
    changes = _apply(tenant, fields, ("name", "timezone", "open_signup"))
    if changes:
        _save_validated(tenant)
        audit_record(actor=actor, tenant_id=tenant.id, action="tenant.update", obj=tenant, changes=changes)
        config_changed()
    return tenant


def _tenant_set_status(*, tenant: Tenant, status: str, actor: Actor, action: str) -> Tenant:
    if tenant.status != status:
        old = tenant.status
        tenant.status = status
        tenant.save(update_fields=["status"])
        audit_record(actor=actor, tenant_id=tenant.id, action=action, obj=tenant, changes={"status": [old, status]})
        config_changed()
    return tenant


@transaction.atomic
def tenant_suspend(*, tenant: Tenant, actor: Actor) -> Tenant:
    """A suspended tenant's APIs stop routing and its portal stops accepting sign-ins."""
    return _tenant_set_status(tenant=tenant, status=Tenant.Status.SUSPENDED, actor=actor, action="tenant.suspend")


@transaction.atomic
def tenant_activate(*, tenant: Tenant, actor: Actor) -> Tenant:
    return _tenant_set_status(tenant=tenant, status=Tenant.Status.ACTIVE, actor=actor, action="tenant.activate")


@transaction.atomic
def membership_set(*, tenant: Tenant, user: User, role: str, actor: Actor) -> TenantMembership:
    if role not in TenantMembership.Role.values:
        raise ValidationError({"role": f"role must be one of {', '.join(TenantMembership.Role.values)}."})
    membership, created = TenantMembership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
    if not created and membership.role != role:
        old = membership.role
        membership.role = role
        membership.save(update_fields=["role"])
        audit_record(
            actor=actor, tenant_id=tenant.id, action="membership.update", obj=membership, changes={"role": [old, role]}
        )
    elif created:
        audit_record(
            actor=actor,
            tenant_id=tenant.id,
            action="membership.create",
            obj=membership,
            changes={"user": user.get_username(), "role": role},
        )
    return membership


# ---------------------------------------------------------------------------
# Policies and plans
# ---------------------------------------------------------------------------

POLICY_FIELDS = ("name", "description", "config", "mode", "on_store_error")


def _clean_policy_config(policy_type: str, config: Any) -> dict[str, Any]:
    try:
        return validation.validate_policy_config(policy_type, config)
    except ValidationError as exc:
        field = "policy_type" if policy_type not in Policy.Type.values else "config"
        raise _field_error(field, exc) from exc


@transaction.atomic
def policy_create(
    *,
    tenant: Tenant,
    name: str,
    policy_type: str,
    config: dict[str, Any],
    actor: Actor,
    mode: str = Policy.Mode.ENFORCE,
    on_store_error: str = Policy.OnStoreError.OPEN,
    description: str = "",
) -> Policy:
    policy = Policy(
        tenant=tenant,
        name=name,
        description=description,
        policy_type=policy_type,
        config=_clean_policy_config(policy_type, config),
        mode=mode,
        on_store_error=on_store_error,
    )
    _save_validated(policy)
    audit_record(
        actor=actor,
        tenant_id=tenant.id,
        action="policy.create",
        obj=policy,
        changes={"name": name, "policy_type": policy_type, "config": policy.config, "mode": mode},
    )
    config_changed()
    return policy


@transaction.atomic
def policy_update(*, policy: Policy, actor: Actor, **fields: Any) -> Policy:
    if "policy_type" in fields and fields["policy_type"] != policy.policy_type:
        raise ValidationError({"policy_type": "policy_type cannot be changed; create a new policy instead."})
    fields.pop("policy_type", None)
    if "config" in fields:
        fields["config"] = _clean_policy_config(policy.policy_type, fields["config"])
    changes = _apply(policy, fields, POLICY_FIELDS)
    if "config" in changes and policy.policy_type == Policy.Type.HEADERS:
        for api in policy.apis.all():
            _check_credential_header_untouched(api.key_header, [policy])
    if changes:
        _save_validated(policy)
        audit_record(actor=actor, tenant_id=policy.tenant_id, action="policy.update", obj=policy, changes=changes)
        config_changed()
    return policy


def policy_delete_refusal(policy: Policy) -> str | None:
    """Why the policy cannot be deleted now (APIs or plans use it), or None."""
    api_names = sorted(policy.apis.values_list("api_name", flat=True))
    plan_names = sorted(policy.plans.values_list("name", flat=True))
    if not api_names and not plan_names:
        return None
    users = " and ".join(
        part for part in (api_names and _named(api_names, "API"), plan_names and _named(plan_names, "plan")) if part
    )
    return f"Policy {policy.name!r} is attached to {users}; detach it from them first, then delete it."


@transaction.atomic
def policy_delete(*, policy: Policy, actor: Actor) -> None:
    """Delete a policy no API or plan uses; otherwise raise DeletionRefused naming them."""
    policy = Policy.objects.select_for_update().get(pk=policy.pk)
    changes = {"name": policy.name, "policy_type": policy.policy_type, "config": policy.config, "mode": policy.mode}
    _delete_unless_refused(policy, refusal=policy_delete_refusal, action="policy.delete", changes=changes, actor=actor)


def policies_check_for_plan(policies: Sequence[Policy]) -> None:
    """A plan takes rate limits, quotas, IP rules and header transforms; CORS, request limits and a response cache
    describe an API's whole traffic (a browser's preflight or a cached answer has no subscriber yet)."""
    for policy in policies:
        if policy.policy_type in Policy.API_ONLY_TYPES:
            raise ValidationError(
                {
                    "policies": f"Policy {policy.name!r} is a {policy.policy_type} policy, which applies to an API's "
                    "whole traffic: attach it to the API, not to a plan."
                }
            )


def policies_check_for_api(policies: Sequence[Policy], *, key_header: str) -> None:
    """At most one cors, request_limits and response_cache policy per API (two would contradict each other), and
    no header transform that touches the API's own key header."""
    first: dict[str, Policy] = {}
    for policy in sorted(policies, key=lambda p: p.name):
        if policy.policy_type not in Policy.SINGLE_PER_API_TYPES:
            continue
        if policy.policy_type in first:
            raise ValidationError(
                {
                    "policies": f"Policy {policy.name!r} is a second {policy.policy_type} policy on this API (with "
                    f"{first[policy.policy_type].name!r}); an API takes one {policy.policy_type} policy."
                }
            )
        first[policy.policy_type] = policy
    _check_credential_header_untouched(key_header, policies)


def _check_credential_header_untouched(key_header: str, policies: Iterable[Policy]) -> None:
    wanted = key_header.lower()
    for policy in policies:
        if policy.policy_type != Policy.Type.HEADERS:
            continue
        for side in ("request", "response"):
            ops = policy.config.get(side, {})
            named = [*ops.get("add", {}), *ops.get("set", {}), *ops.get("remove", [])]
            if any(name.lower() == wanted for name in named):
                raise ValidationError(
                    {
                        "policies": f"Policy {policy.name!r} changes {key_header!r}, the header this API reads keys "
                        "from; a header transform cannot touch the caller's credential."
                    }
                )


def _check_same_tenant(tenant_id: str, objects: Iterable[models.Model], field: str) -> list[Any]:
    items = list(objects)
    foreign = [str(o.pk) for o in items if getattr(o, "tenant_id", None) != tenant_id]
    if foreign:
        raise ValidationError({field: f"Unknown {field} for this tenant: {', '.join(foreign)}."})
    return items


@transaction.atomic
def plan_create(
    *,
    tenant: Tenant,
    name: str,
    actor: Actor,
    policies: Iterable[Policy] = (),
    approval: str = Plan.Approval.AUTO,
    description: str = "",
    websocket_max_connections: int | None = None,
) -> Plan:
    policy_list = _check_same_tenant(tenant.id, policies, "policies")
    policies_check_for_plan(policy_list)
    plan = Plan(
        tenant=tenant,
        name=name,
        approval=approval,
        description=description,
        websocket_max_connections=websocket_max_connections,
    )
    _save_validated(plan)
    if policy_list:
        plan.policies.add(*policy_list)  # a new plan has no links: set would read them first
    audit_record(
        actor=actor,
        tenant_id=tenant.id,
        action="plan.create",
        obj=plan,
        changes={
            "name": name,
            "approval": approval,
            "policies": [p.pk for p in policy_list],
            **({"websocket_max_connections": websocket_max_connections} if websocket_max_connections else {}),
        },
    )
    config_changed()
    return plan


@transaction.atomic
def plan_update(*, plan: Plan, actor: Actor, policies: Iterable[Policy] | None = None, **fields: Any) -> Plan:
    changes = _apply(plan, fields, ("name", "description", "approval", "websocket_max_connections"))
    if changes:
        _save_validated(plan)
    if policies is not None:
        new = _check_same_tenant(plan.tenant_id, policies, "policies")
        policies_check_for_plan(new)
        old_ids = sorted(plan.policies.values_list("pk", flat=True))
        new_ids = sorted(p.pk for p in new)
        if old_ids != new_ids:
            plan.policies.set(new)
            changes["policies"] = [old_ids, new_ids]
    if changes:
        audit_record(actor=actor, tenant_id=plan.tenant_id, action="plan.update", obj=plan, changes=changes)
        config_changed()
    return plan


def plan_delete_refusal(plan: Plan) -> str | None:
    """Why the plan cannot be deleted now (open subscriptions are on it, or will move to it), or None."""
    by_status = dict(
        plan.subscriptions.open()
        .order_by()
        .values_list("status")
        .annotate(n=models.Count("pk"))
        .values_list("status", "n")
    )
    incoming = plan.pending_subscriptions.count()
    if not by_status and not incoming:
        return None
    total = sum(by_status.values())
    parts = [f"{by_status[st]} {st}" for st in OPEN_SUBSCRIPTION_STATUSES if by_status.get(st)]
    if incoming:
        parts.append(f"{incoming} scheduled to move to it")
    return (
        f"Plan {plan.name!r} is referenced by {_count(total + incoming, 'subscription')} ({', '.join(parts)}); move them to"
        " another plan (change-plan) or end them first, then delete it. Archive it to stop new subscriptions"
        " meanwhile."
    )


@transaction.atomic
def plan_delete(*, plan: Plan, actor: Actor) -> None:
    """Delete a plan no subscription references; otherwise raise DeletionRefused with their count."""
    plan = Plan.objects.select_for_update().get(pk=plan.pk)
    changes: dict[str, Any] = {
        "name": plan.name,
        "approval": plan.approval,
        "policies": sorted(plan.policies.values_list("pk", flat=True)),
    }
    offered_by = sorted(plan.apis.values_list("pk", flat=True))
    if offered_by:  # the APIs that offered it offer it no more
        changes["no_longer_offered_by"] = offered_by
    reason = plan_delete_refusal(plan)
    if reason is None:
        # Cancelled and rejected subscriptions keep their history in the audit log; their plan becomes none.
        closed = list(plan.subscriptions.values_list("pk", flat=True))
        if closed:
            changes["closed_subscriptions_detached"] = closed
            Subscription.objects.filter(pk__in=closed).update(plan=None)
    _delete_unless_refused(plan, refusal=plan_delete_refusal, action="plan.delete", changes=changes, actor=actor)


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------

API_FIELDS = (
    "api_name",
    "description",
    "base_path",
    "host",
    "upstream_url",
    "strip_path",
    "sunset_at",
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
    "visibility",
    "openapi_spec",
    "restrict_to_spec",
    "subscription_approval",
    "auth_method",
    "validation",
)


def api_check(api: Api) -> None:
    """Validate an API's routing and key settings (used by api_create/api_update and the admin form)."""
    errors: dict[str, list[str]] = {}
    checks = (
        ("base_path", validation.validate_base_path),
        ("host", validation.validate_host),
        ("upstream_url", validation.validate_upstream_url),
        ("key_header", validation.validate_header_name),
        ("key_query_param", validation.validate_query_param),
    )
    for field, check in checks:
        try:
            setattr(api, field, check(getattr(api, field)))
        except ValidationError as exc:
            errors[field] = exc.messages
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in api.api_name or ""):
        # The name is shown in the portal and sent in the gateway's WWW-Authenticate realm.
        errors["api_name"] = ["The name may not contain control characters or line breaks."]
    if api.openapi_spec is not None and not isinstance(api.openapi_spec, dict):
        errors["openapi_spec"] = ["openapi_spec must be a JSON object (an OpenAPI document)."]
    elif api.restrict_to_spec and not (api.openapi_spec or {}).get("paths"):
        errors["restrict_to_spec"] = ["restrict_to_spec needs an OpenAPI document with paths (openapi_spec)."]
    elif api.restrict_to_spec:
        too_big = _restricted_spec_too_big((api.openapi_spec or {}).get("paths"))
        if too_big:
            errors["restrict_to_spec"] = [too_big]
    if api.auth_method not in Api.AuthMethod.values:
        errors["auth_method"] = [f"auth_method must be one of {', '.join(Api.AuthMethod.values)}."]
    if api.validation not in Api.Validation.values:
        errors["validation"] = [f"validation must be one of {', '.join(Api.Validation.values)}."]
    elif api.validation != Api.Validation.OFF and not (
        isinstance(api.openapi_spec, dict) and api.openapi_spec.get("paths")
    ):
        errors["validation"] = [f"validation {api.validation!r} needs an OpenAPI document with paths (openapi_spec)."]
    if errors:
        raise ValidationError(errors)
    if api.total_timeout < api.connect_timeout:
        raise ValidationError({"total_timeout": "total_timeout must be at least connect_timeout."})
    if api.tenant_id:
        _check_route_not_captured(api)


# A restricted API's spec paths go into every gateway worker's route table (apimgmt/spec_operations.py), compiled on
# every reload: bounded, so one tenant's document cannot cost every worker of every tenant memory and time.
MAX_RESTRICTED_OPERATIONS = 10_000
MAX_RESTRICTED_PATHS_CHARS = 5_000_000  # the OpenAPI import's limit for a whole document


def _restricted_spec_too_big(paths: Any) -> str | None:
    from apimgmt.spec_operations import METHODS

    if not isinstance(paths, dict):
        return None
    operations = sum(1 for item in paths.values() if isinstance(item, dict) for m in METHODS if m in item)
    size = len(json.dumps(paths)) if operations <= MAX_RESTRICTED_OPERATIONS else 0
    if operations <= MAX_RESTRICTED_OPERATIONS and size <= MAX_RESTRICTED_PATHS_CHARS:
        return None
    this_one = f"{operations:,} operations" if size == 0 else f"{size:,} characters of paths"
    return (
        f"restrict_to_spec takes an OpenAPI document of at most {MAX_RESTRICTED_OPERATIONS:,} operations and "
        f"{MAX_RESTRICTED_PATHS_CHARS:,} characters of paths (this one: {this_one}); split the API or turn "
        "restrict_to_spec off."
    )


def _check_route_not_captured(api: Api) -> None:
    """Refuse a route that would take requests now answered by another tenant's API.

    The gateway prefers a host-bound route to a host-less one and a longer base_path to a
    shorter one, so without this a tenant could publish /their/base_path/x (or bind the shared
    host to the same path) and receive another tenant's consumers' traffic.
    """
    if (api.tenant_id, api.host, api.base_path) in _routes_checked.get():
        return  # checked with the rest of its configuration document (routes_captured)
    live = Api.objects.exclude(status=Api.Status.RETIRED).filter(host__in={"", api.host})
    if api.pk:
        live = live.exclude(pk=api.pk)
    owners = {(h, path): tenant for tenant, h, path in live.values_list("tenant_id", "host", "base_path")}
    if _captures(api.tenant_id, api.host, api.base_path, owners):
        # The other tenant's path is not named: it may belong to an unpublished API.
        raise ValidationError(
            {"base_path": f"base_path {api.base_path!r} overlaps another tenant's route; choose another."}
        )


def _captures(
    tenant_id: str, host: str, base_path: str, owners: dict[tuple[str, str], str], *, listed: bool = False
) -> bool:
    """Whether tenant_id's route (host, base_path) would take another tenant's requests, given the live routes as
    {(host, base_path): tenant id}: every other one, and (``listed``) this one too."""
    exact = owners.get((host, base_path))
    if exact is not None and not (listed and exact == tenant_id):
        return False  # the exact route is taken: the unique constraint says so in its own words
    # Who answers base_path now: the longest route on the same host, else the longest host-less one.
    above = [base_path[:i] for i in range(len(base_path) - 1, 0, -1) if base_path[i] == "/"]
    captured = False
    for route_host in dict.fromkeys([host, ""]):
        paths = above if route_host == host else [base_path, *above]
        owner = next((owners[(route_host, p)] for p in paths if (route_host, p) in owners), None)
        if owner is not None:
            captured = owner != tenant_id
            break
    # Bound to a host, it also wins over host-less routes below it.
    if host and not captured:
        below = base_path + "/"
        captured = any(
            tenant != tenant_id and not h and (p == base_path or p.startswith(below))
            for (h, p), tenant in owners.items()
        )
    return captured


# Routes a configuration apply has checked at once (routes_captured) and that api_check then need not check one by
# one: (tenant id, host, base_path).
_routes_checked: ContextVar[frozenset[tuple[str, str, str]]] = ContextVar("routes_checked", default=frozenset())


def routes_captured(
    tenant_id: str, routes: Iterable[tuple[str, str]], own: Iterable[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Of a tenant's ``routes`` ((host, base_path) of APIs it creates or changes), those that would take requests
    another tenant's live API answers, in one query for them all. ``own`` is every live route the tenant will have
    (its rows are not read: a configuration document replaces them)."""
    checked = set(routes)
    hosts = {""} | {host for host, _path in checked}
    owners = {
        (h, path): tenant
        for tenant, h, path in Api.objects.exclude(status=Api.Status.RETIRED)
        .exclude(tenant_id=tenant_id)
        .filter(host__in=hosts)
        .values_list("tenant_id", "host", "base_path")
    }
    for route in own:
        owners.setdefault(route, tenant_id)
    for route in checked:
        owners.setdefault(route, tenant_id)
    return {(host, path) for host, path in checked if _captures(tenant_id, host, path, owners, listed=True)}


@contextmanager
def routes_checked(tenant_id: str, routes: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Within: api_create and api_update skip the per-API route check for these routes of tenant_id (already
    checked by routes_captured)."""
    token = _routes_checked.set(frozenset((tenant_id, host, path) for host, path in routes))
    try:
        yield
    finally:
        _routes_checked.reset(token)


def _check_auth_issuers(auth_method: str, issuers: Sequence[JwtIssuer]) -> None:
    """JWT authentication needs at least one issuer whose tokens it accepts."""
    if auth_method != Api.AuthMethod.KEY and not issuers:
        raise ValidationError(
            {"jwt_issuers": f"auth_method {auth_method!r} needs at least one JWT issuer (jwt_issuers)."}
        )


def _validate_targets(targets: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    cleaned: list[tuple[str, int]] = []
    for index, (url, weight) in enumerate(targets):
        try:
            validation.validate_upstream_url(url)
        except ValidationError as exc:
            raise ValidationError({"targets": [f"target {index}: {m}" for m in exc.messages]}) from exc
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 100:
            raise ValidationError({"targets": f"target {index}: weight must be an integer from 1 to 100."})
        cleaned.append((url, weight))
    return cleaned


@transaction.atomic
def api_create(
    *,
    tenant: Tenant,
    api_name: str,
    base_path: str,
    upstream_url: str,
    actor: Actor,
    status: str = Api.Status.DRAFT,
    policies: Iterable[Policy] = (),
    plans: Iterable[Plan] = (),
    targets: Sequence[tuple[str, int]] = (),
    jwt_issuers: Iterable[JwtIssuer] = (),
    **options: Any,
) -> Api:
    """Publish an API; ``plans`` are the plans it offers (same tenant): with any, subscribing needs one of them.
    ``jwt_issuers`` (same tenant) are the issuers whose tokens it accepts when ``auth_method`` is jwt or key_or_jwt."""
    unknown = sorted(set(options) - set(API_FIELDS))
    if unknown:
        raise ValidationError({name: "Unknown field." for name in unknown})
    if status not in Api.Status.values:
        raise ValidationError({"status": f"status must be one of {', '.join(Api.Status.values)}."})
    api = Api(
        tenant=tenant, api_name=api_name, base_path=base_path, upstream_url=upstream_url, status=status, **options
    )
    api_check(api)
    policy_list = _check_same_tenant(tenant.id, policies, "policies")
    policies_check_for_api(policy_list, key_header=api.key_header)
    plan_list = _check_same_tenant(tenant.id, plans, "plans")
    issuer_list = _check_same_tenant(tenant.id, jwt_issuers, "jwt_issuers")
    _check_auth_issuers(api.auth_method, issuer_list)
    target_list = _validate_targets(targets)
    _save_validated(api)
    # A new API has no links yet: add them (set would read the links first, one query each).
    for related, linked in ((api.policies, policy_list), (api.plans, plan_list), (api.jwt_issuers, issuer_list)):
        if linked:
            related.add(*linked)
    for url, weight in target_list:
        UpstreamTarget.objects.create(api=api, url=url, weight=weight)
    audit_record(
        actor=actor,
        tenant_id=tenant.id,
        action="api.create",
        obj=api,
        changes={
            "api_name": api_name,
            "base_path": base_path,
            "upstream_url": upstream_url,
            "status": status,
            "plans": sorted(p.pk for p in plan_list),
            "auth_method": api.auth_method,
            "jwt_issuers": sorted(i.pk for i in issuer_list),
            "validation": api.validation,
        },
    )
    config_changed()
    return api


@transaction.atomic
def api_update(
    *,
    api: Api,
    actor: Actor,
    policies: Iterable[Policy] | None = None,
    plans: Iterable[Plan] | None = None,
    targets: Sequence[tuple[str, int]] | None = None,
    jwt_issuers: Iterable[JwtIssuer] | None = None,
    **fields: Any,
) -> Api:
    """Change an API. A plan taken off ``plans`` is no longer offered; subscriptions already on it keep it."""
    if "tenant" in fields or "tenant_id" in fields:
        raise ValidationError({"tenant_id": "tenant_id cannot be changed after creation."})
    if "status" in fields:
        raise ValidationError({"status": "Use activate, deprecate or retire to change the status."})
    changes = _apply(api, fields, API_FIELDS)
    api_check(api)
    new_issuers = _check_same_tenant(api.tenant_id, jwt_issuers, "jwt_issuers") if jwt_issuers is not None else None
    _check_auth_issuers(api.auth_method, new_issuers if new_issuers is not None else list(api.jwt_issuers.all()))
    if policies is not None or "key_header" in changes:
        attached = _check_same_tenant(api.tenant_id, policies, "policies") if policies is not None else None
        policies_check_for_api(
            attached if attached is not None else list(api.policies.all()), key_header=api.key_header
        )
    if changes:
        _save_validated(api)
    if new_issuers is not None:
        old_ids = sorted(api.jwt_issuers.values_list("pk", flat=True))
        new_ids = sorted(i.pk for i in new_issuers)
        if old_ids != new_ids:
            api.jwt_issuers.set(new_issuers)
            changes["jwt_issuers"] = [old_ids, new_ids]
    if policies is not None:
        new = _check_same_tenant(api.tenant_id, policies, "policies")
        old_ids = sorted(api.policies.values_list("pk", flat=True))
        new_ids = sorted(p.pk for p in new)
        if old_ids != new_ids:
            api.policies.set(new)
            changes["policies"] = [old_ids, new_ids]
    if plans is not None:
        new_plans = _check_same_tenant(api.tenant_id, plans, "plans")
        old_ids = sorted(api.plans.values_list("pk", flat=True))
        new_ids = sorted(p.pk for p in new_plans)
        if old_ids != new_ids:
            api.plans.set(new_plans)
            changes["plans"] = [old_ids, new_ids]
    if targets is not None:
        cleaned = _validate_targets(targets)
        old_targets = [[t.url, t.weight] for t in api.targets.all()]
        if old_targets != [list(t) for t in cleaned]:
            api.targets.all().delete()
            for url, weight in cleaned:
                UpstreamTarget.objects.create(api=api, url=url, weight=weight)
            changes["targets"] = [old_targets, [list(t) for t in cleaned]]
    if changes:
        audit_record(actor=actor, tenant_id=api.tenant_id, action="api.update", obj=api, changes=changes)
        config_changed()
    return api


_API_TRANSITIONS: dict[str, tuple[str, ...]] = {
    Api.Status.ACTIVE: (Api.Status.DRAFT, Api.Status.DEPRECATED),
    Api.Status.DEPRECATED: (Api.Status.ACTIVE,),
    Api.Status.RETIRED: (Api.Status.DRAFT, Api.Status.ACTIVE, Api.Status.DEPRECATED),
}


def _api_transition(*, api: Api, to: str, actor: Actor, extra: dict[str, Any] | None = None) -> Api:
    if api.status == to:
        return api
    if api.status not in _API_TRANSITIONS[to]:
        raise ValidationError({"status": f"An API that is {api.status} cannot become {to}."})
    old = api.status
    api.status = to
    update = ["status", "updated_at"]
    for field, value in (extra or {}).items():
        setattr(api, field, value)
        update.append(field)
    api.save(update_fields=update)
    changes = {"status": [old, to], **{k: _json_value(v) for k, v in (extra or {}).items()}}
    audit_record(actor=actor, tenant_id=api.tenant_id, action=f"api.{to}", obj=api, changes=changes)
    if to in (Api.Status.DEPRECATED, Api.Status.RETIRED):
        events.emit(tenant_id=api.tenant_id, event_type=f"api.{to}", data=events.api_data(api))
    config_changed()
    return api


@transaction.atomic
def api_activate(*, api: Api, actor: Actor) -> Api:
    return _api_transition(api=api, to=Api.Status.ACTIVE, actor=actor)


@transaction.atomic
def api_deprecate(*, api: Api, actor: Actor, sunset_at: datetime | None = None) -> Api:
    """Still routed, but responses carry Deprecation (and Sunset when a date is set)."""
    extra = {"sunset_at": sunset_at} if sunset_at is not None else None
    return _api_transition(api=api, to=Api.Status.DEPRECATED, actor=actor, extra=extra)


@transaction.atomic
def api_retire(*, api: Api, actor: Actor) -> Api:
    """Retired APIs stop routing (404) and their open subscriptions are cancelled. One-way."""
    api = _api_transition(api=api, to=Api.Status.RETIRED, actor=actor)
    cancelled = list(Subscription.objects.filter(api=api).open().select_for_update())
    Subscription.objects.filter(pk__in=[sub.pk for sub in cancelled]).update(
        status=Subscription.Status.CANCELLED,
        decided_at=timezone.now(),
        decision_note="API retired",
        pending_plan=None,
        plan_change_at=None,
    )
    for subscription in cancelled:
        subscription.status = Subscription.Status.CANCELLED
        subscription.decision_note = "API retired"
        events.emit(
            tenant_id=api.tenant_id, event_type="subscription.cancelled", data=events.subscription_data(subscription)
        )
    return api


API_DELETABLE = (Api.Status.DRAFT, Api.Status.RETIRED)


def api_delete_refusal(api: Api) -> str | None:
    """Why the API cannot be deleted now (it is live), or None."""
    if api.status in API_DELETABLE:
        return None
    return (
        f"API {api.api_name!r} is {api.status}: only draft or retired APIs can be deleted. "
        "Retire it first (it stops routing and its open subscriptions are cancelled), then delete it."
    )


@transaction.atomic
def api_delete(*, api: Api, actor: Actor) -> None:
    """Delete a draft or retired API with its subscriptions and targets; its usage records stay (plain ids)."""
    api = Api.objects.select_for_update().get(pk=api.pk)
    subscriptions = dict(
        api.subscriptions.order_by().values_list("status").annotate(n=models.Count("pk")).values_list("status", "n")
    )
    changes = {
        "api_name": api.api_name,
        "base_path": api.base_path,
        "host": api.host,
        "status": api.status,
        "subscriptions_deleted": sum(subscriptions.values()),
        "subscriptions_deleted_by_status": subscriptions,
        "targets_deleted": api.targets.count(),
        "policies_detached": sorted(api.policies.values_list("pk", flat=True)),
        "plans_detached": sorted(api.plans.values_list("pk", flat=True)),
    }
    _delete_unless_refused(api, refusal=api_delete_refusal, action="api.delete", changes=changes, actor=actor)


# ---------------------------------------------------------------------------
# Consumers
# ---------------------------------------------------------------------------


def consumer_owner_check(tenant_id: str, owner: User) -> None:
    """An app belongs to a member of its tenant (or to platform staff)."""
    if owner.is_superuser:
        return
    if not TenantMembership.objects.filter(tenant_id=tenant_id, user=owner).exists():
        raise ValidationError({"owner": "The owner must be a member of this consumer's tenant."})


@transaction.atomic
def consumer_create(
    *,
    tenant: Tenant,
    name: str,
    actor: Actor,
    owner: User | None = None,
    description: str = "",
    ip_allow: Sequence[str] = (),
    ip_deny: Sequence[str] = (),
) -> Consumer:
    if owner is not None:
        consumer_owner_check(tenant.id, owner)
    lists = _clean_ip_lists({"ip_allow": list(ip_allow), "ip_deny": list(ip_deny)})
    consumer = Consumer(tenant=tenant, name=name.strip(), owner=owner, description=description, **lists)
    _save_validated(consumer)
    changes: dict[str, Any] = {"name": consumer.name, **{k: v for k, v in lists.items() if v}}
    audit_record(actor=actor, tenant_id=tenant.id, action="consumer.create", obj=consumer, changes=changes)
    return consumer


IP_LIST_FIELDS = ("ip_allow", "ip_deny")


def _clean_ip_lists(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with its ip_allow/ip_deny (when present) as canonical CIDR lists; errors name the field."""
    cleaned = dict(fields)
    errors: dict[str, list[str]] = {}
    for name in IP_LIST_FIELDS:
        if name in cleaned:
            try:
                cleaned[name] = validation.validate_cidr_list(cleaned[name], name)
            except ValidationError as exc:
                errors[name] = exc.messages
    if errors:
        raise ValidationError(errors)
    return cleaned


@transaction.atomic
def consumer_update(*, consumer: Consumer, actor: Actor, **fields: Any) -> Consumer:
    if "tenant" in fields or "tenant_id" in fields:
        raise ValidationError({"tenant_id": "tenant_id cannot be changed after creation."})
    if "name" in fields:
        fields["name"] = str(fields["name"]).strip()
    if fields.get("owner") is not None:
        consumer_owner_check(consumer.tenant_id, fields["owner"])
    changes = _apply(consumer, _clean_ip_lists(fields), ("name", "description", "owner", *IP_LIST_FIELDS))
    if changes:
        _save_validated(consumer)
        audit_record(actor=actor, tenant_id=consumer.tenant_id, action="consumer.update", obj=consumer, changes=changes)
    if set(changes) & set(IP_LIST_FIELDS):
        consumer_changed(consumer.pk)  # its keys' cached records carry the lists: every gateway drops them
    return consumer


def _consumer_set_status(*, consumer: Consumer, status: str, actor: Actor) -> Consumer:
    if consumer.status != status:
        old = consumer.status
        consumer.status = status
        consumer.save(update_fields=["status"])
        action = "consumer.block" if status == Consumer.Status.BLOCKED else "consumer.unblock"
        audit_record(
            actor=actor, tenant_id=consumer.tenant_id, action=action, obj=consumer, changes={"status": [old, status]}
        )
        event_type = "consumer.blocked" if status == Consumer.Status.BLOCKED else "consumer.unblocked"
        events.emit(tenant_id=consumer.tenant_id, event_type=event_type, data=events.consumer_data(consumer))
        consumer_changed(consumer.pk)
    return consumer


@transaction.atomic
def consumer_block(*, consumer: Consumer, actor: Actor) -> Consumer:
    """Blocked consumers' keys are refused (403) on every gateway worker within a second."""
    return _consumer_set_status(consumer=consumer, status=Consumer.Status.BLOCKED, actor=actor)


@transaction.atomic
def consumer_unblock(*, consumer: Consumer, actor: Actor) -> Consumer:
    return _consumer_set_status(consumer=consumer, status=Consumer.Status.ACTIVE, actor=actor)


@transaction.atomic
def consumer_delete(*, consumer: Consumer, actor: Actor) -> None:
    """Delete an app: its keys are revoked first so the deletion is audited key by key."""
    for key in consumer.keys.filter(active=True):
        api_key_revoke(key=key, actor=actor)
    audit_record(
        actor=actor,
        tenant_id=consumer.tenant_id,
        action="consumer.delete",
        obj=consumer,
        changes={"name": consumer.name},
    )
    consumer_changed(consumer.pk)
    consumer.delete()


# ---------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------


def _new_key_row(
    *, consumer: Consumer, name: str, expires_at: datetime | None, rotated_from: ApiKey | None
) -> tuple[ApiKey, str]:
    plaintext = keys.generate_key()
    key = ApiKey(
        consumer=consumer,
        name=name,
        key_prefix=keys.display_prefix(plaintext),
        key_hash=keys.hash_key(plaintext),
        expires_at=expires_at,
        rotated_from=rotated_from,
    )
    key.save(force_insert=True)
    return key, plaintext


def api_key_check(*, consumer: Consumer | None, expires_at: datetime | None) -> None:
    """What api_key_create refuses: a blocked consumer, or an expiry that is naive or not in the future."""
    if consumer is not None and consumer.status != Consumer.Status.ACTIVE:
        raise ValidationError({"consumer_id": "This consumer is blocked; unblock it before creating keys."})
    if expires_at is None:
        return
    if timezone.is_naive(expires_at):
        raise ValidationError({"expires_at": "expires_at must include a time zone (e.g. 2027-01-01T00:00:00Z)."})
    if expires_at <= timezone.now():
        raise ValidationError({"expires_at": "expires_at must be in the future."})


@transaction.atomic
def api_key_create(
    *,
    consumer: Consumer,
    actor: Actor,
    name: str = "",
    expires_at: datetime | None = None,
    ip_allow: Sequence[str] = (),
    ip_deny: Sequence[str] = (),
) -> tuple[ApiKey, str]:
    """Create a key and return it with its plaintext — the only time the plaintext exists."""
    if len(name) > 100:
        raise ValidationError({"name": "name must be at most 100 characters."})
    lists = _clean_ip_lists({"ip_allow": list(ip_allow), "ip_deny": list(ip_deny)})
    api_key_check(consumer=consumer, expires_at=expires_at)
    key, plaintext = _new_key_row(consumer=consumer, name=name, expires_at=expires_at, rotated_from=None)
    if lists["ip_allow"] or lists["ip_deny"]:
        key.ip_allow, key.ip_deny = lists["ip_allow"], lists["ip_deny"]
        key.save(update_fields=list(IP_LIST_FIELDS))
    audit_record(
        actor=actor,
        tenant_id=consumer.tenant_id,
        action="api_key.create",
        obj=key,
        changes={
            "name": name,
            "key_prefix": key.key_prefix,
            "consumer_id": consumer.pk,
            "expires_at": expires_at,
            **{k: v for k, v in lists.items() if v},
        },
    )
    events.emit(tenant_id=consumer.tenant_id, event_type="key.created", data=events.key_data(key))
    return key, plaintext


@transaction.atomic
def api_key_rotate(
    *, key: ApiKey, actor: Actor, overlap_seconds: int = DEFAULT_ROTATION_OVERLAP_SECONDS, name: str | None = None
) -> tuple[ApiKey, str]:
    """Create a successor key; the old one keeps working for ``overlap_seconds`` (0 = stops now)."""
    if (
        isinstance(overlap_seconds, bool)
        or not isinstance(overlap_seconds, int)
        or not 0 <= overlap_seconds <= MAX_OVERLAP_SECONDS
    ):
        raise ValidationError(
            {"overlap_seconds": f"overlap_seconds must be an integer from 0 to {MAX_OVERLAP_SECONDS}."}
        )
    key = ApiKey.objects.select_for_update().select_related("consumer").get(pk=key.pk)
    if not key.is_usable():
        raise ValidationError({"key_id": "Only an active, unexpired key can be rotated."})
    if key.consumer.status != Consumer.Status.ACTIVE:
        raise ValidationError({"consumer_id": "This consumer is blocked; unblock it before rotating its keys."})
    now = timezone.now()
    old_expiry = now + timedelta(seconds=overlap_seconds)
    if key.expires_at is None or key.expires_at > old_expiry:
        previous = key.expires_at
        key.expires_at = old_expiry
        if overlap_seconds == 0:
            key.active = False
            key.revoked_at = now
        key.save(update_fields=["expires_at", "active", "revoked_at"])
    else:
        previous = key.expires_at
    successor, plaintext = _new_key_row(
        consumer=key.consumer, name=name if name is not None else key.name, expires_at=None, rotated_from=key
    )
    if key.ip_allow or key.ip_deny:
        # The successor is restricted exactly as the key it replaces: a rotation never lifts an IP restriction.
        successor.ip_allow, successor.ip_deny = list(key.ip_allow), list(key.ip_deny)
        successor.save(update_fields=["ip_allow", "ip_deny"])
    audit_record(
        actor=actor,
        tenant_id=key.consumer.tenant_id,
        action="api_key.rotate",
        obj=key,
        changes={
            "successor": successor.pk,
            "expires_at": [previous, key.expires_at],
            "overlap_seconds": overlap_seconds,
        },
    )
    audit_record(
        actor=actor,
        tenant_id=key.consumer.tenant_id,
        action="api_key.create",
        obj=successor,
        changes={
            "name": successor.name,
            "key_prefix": successor.key_prefix,
            "rotated_from": key.pk,
            **({"ip_allow": successor.ip_allow, "ip_deny": successor.ip_deny} if key.ip_allow or key.ip_deny else {}),
        },
    )
    tenant_id = key.consumer.tenant_id
    events.emit(tenant_id=tenant_id, event_type="key.rotated", data=events.key_data(key, successor_key_id=successor.pk))
    events.emit(tenant_id=tenant_id, event_type="key.created", data=events.key_data(successor, rotated_from=key.pk))
    keys_changed([key.key_hash])
    return successor, plaintext


@transaction.atomic
def api_key_update(*, key: ApiKey, actor: Actor, **fields: Any) -> ApiKey:
    """Rename a key or change its IP lists; every gateway drops its cached record of the key at once."""
    key = ApiKey.objects.select_for_update().select_related("consumer").get(pk=key.pk)
    if key.revoked_at is not None:
        raise ValidationError({"key_id": "A revoked key cannot be changed."})
    if len(str(fields.get("name", ""))) > 100:
        raise ValidationError({"name": "name must be at most 100 characters."})
    changes = _apply(key, _clean_ip_lists(fields), ("name", *IP_LIST_FIELDS))
    if changes:
        key.save(update_fields=list(changes))
        audit_record(actor=actor, tenant_id=key.consumer.tenant_id, action="api_key.update", obj=key, changes=changes)
        keys_changed([key.key_hash])
    return key


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor: Actor) -> ApiKey:
    """Revoke for good: a revoked key can never be re-activated."""
    key = ApiKey.objects.select_for_update().select_related("consumer").get(pk=key.pk)
    if key.revoked_at is not None:
        return key
    key.active = False
    key.revoked_at = timezone.now()
    key.save(update_fields=["active", "revoked_at"])
    audit_record(
        actor=actor,
        tenant_id=key.consumer.tenant_id,
        action="api_key.revoke",
        obj=key,
        changes={"active": [True, False]},
    )
    events.emit(tenant_id=key.consumer.tenant_id, event_type="key.revoked", data=events.key_data(key))
    keys_changed([key.key_hash])
    return key


# ---------------------------------------------------------------------------
# JWT issuers and consumer identities
# ---------------------------------------------------------------------------

JWT_ISSUER_FIELDS = JwtIssuer.SETTINGS


def jwt_issuer_check(issuer: JwtIssuer) -> None:
    """Validate an issuer's settings, normalising them in place (the admin's form calls it too)."""
    cleaned, errors = validation.jwt_issuer_errors(
        issuer=issuer.issuer,
        audiences=issuer.audiences,
        jwks_url=issuer.jwks_url,
        public_keys=issuer.public_keys,
        algorithms=issuer.algorithms,
        leeway_seconds=issuer.leeway_seconds,
        consumer_claim=issuer.consumer_claim,
        token_in_query=issuer.token_in_query,
    )
    if not isinstance(issuer.auto_provision, bool):
        errors["auto_provision"] = ["auto_provision must be true or false."]
    if errors:
        raise ValidationError(errors)
    for name, value in cleaned.items():
        setattr(issuer, name, value)


def _issuer_summary(issuer: JwtIssuer) -> dict[str, Any]:
    """What the audit log keeps of an issuer: its settings, the inline keys by kid only."""
    summary = {name: getattr(issuer, name) for name in JWT_ISSUER_FIELDS if name != "public_keys"}
    keys_ = (issuer.public_keys or {}).get("keys", [])
    summary["public_keys"] = [key.get("kid", "") for key in keys_] if keys_ else None
    return summary


@transaction.atomic
def jwt_issuer_create(
    *,
    tenant: Tenant,
    name: str,
    issuer: str,
    actor: Actor,
    audiences: Sequence[str] = (),
    jwks_url: str = "",
    public_keys: dict[str, Any] | None = None,
    algorithms: Sequence[str] = ("RS256",),
    leeway_seconds: int = 30,
    consumer_claim: str = "sub",
    auto_provision: bool = False,
    token_in_query: str = "",
) -> JwtIssuer:
    """An identity provider whose tokens the tenant's APIs may accept (``Api.jwt_issuers``)."""
    row = JwtIssuer(
        tenant=tenant,
        name=name,
        issuer=issuer,
        audiences=list(audiences),
        jwks_url=jwks_url,
        public_keys=public_keys,
        algorithms=list(algorithms),
        leeway_seconds=leeway_seconds,
        consumer_claim=consumer_claim,
        auto_provision=auto_provision,
        token_in_query=token_in_query,
    )
    jwt_issuer_check(row)
    _save_validated(row)
    audit_record(actor=actor, tenant_id=tenant.id, action="jwt_issuer.create", obj=row, changes=_issuer_summary(row))
    config_changed()
    return row


@transaction.atomic
def jwt_issuer_update(*, jwt_issuer: JwtIssuer, actor: Actor, **fields: Any) -> JwtIssuer:
    """Change an issuer (``fields`` may include its ``issuer``, the iss value, like any other field)."""
    issuer = jwt_issuer
    if "tenant" in fields or "tenant_id" in fields:
        raise ValidationError({"tenant_id": "tenant_id cannot be changed after creation."})
    before = _issuer_summary(issuer)
    _apply(issuer, fields, JWT_ISSUER_FIELDS)
    jwt_issuer_check(issuer)
    after = _issuer_summary(issuer)
    changes = {name: [before[name], after[name]] for name in after if before[name] != after[name]}
    remapped = [name for name in ("issuer", "consumer_claim") if name in changes]
    if remapped:
        # Identities are external ids of this provider under this claim: with another iss or claim, subjects of a
        # different provider (or another claim's values) would act as the consumers mapped today.
        count = ConsumerIdentity.objects.filter(issuer=issuer).count()
        if count:
            raise ValidationError(
                {
                    name: f"{name} cannot change while {count} consumer identit{'y' if count == 1 else 'ies'} "
                    "map this issuer's tokens to consumers; delete them first, or create a new issuer."
                    for name in remapped
                }
            )
    if changes:
        _save_validated(issuer)
        audit_record(actor=actor, tenant_id=issuer.tenant_id, action="jwt_issuer.update", obj=issuer, changes=changes)
        config_changed()
    return issuer


def jwt_issuer_delete_refusal(issuer: JwtIssuer) -> str | None:
    """Why the issuer cannot be deleted now (APIs accept its tokens), or None."""
    api_names = sorted(issuer.apis.values_list("api_name", flat=True))
    if not api_names:
        return None
    return (
        f"JWT issuer {issuer.name!r} is accepted by {_named(api_names, 'API')}; take it off their jwt_issuers "
        "first, then delete it."
    )


@transaction.atomic
def jwt_issuer_delete(*, issuer: JwtIssuer, actor: Actor) -> None:
    """Delete an issuer no API accepts, with its consumer identities; otherwise raise DeletionRefused."""
    issuer = JwtIssuer.objects.select_for_update().get(pk=issuer.pk)
    external_ids = list(issuer.identities.values_list("external_id", flat=True))
    changes = {"name": issuer.name, "issuer": issuer.issuer, "identities_deleted": len(external_ids)}
    if jwt_issuer_delete_refusal(issuer) is None:
        identities_changed([(issuer.pk, external_id) for external_id in external_ids])
    _delete_unless_refused(
        issuer, refusal=jwt_issuer_delete_refusal, action="jwt_issuer.delete", changes=changes, actor=actor
    )


def _check_external_id(external_id: Any) -> str:
    if not isinstance(external_id, str) or not external_id or len(external_id) > 255:
        raise ValidationError({"external_id": "external_id must be 1 to 255 characters (the token's claim value)."})
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in external_id):
        raise ValidationError({"external_id": "external_id must not contain control characters."})
    return external_id


@transaction.atomic
def consumer_identity_create(
    *, consumer: Consumer, issuer: JwtIssuer, external_id: str, actor: Actor
) -> ConsumerIdentity:
    """Say who ``consumer`` is at ``issuer``: tokens whose consumer claim is ``external_id`` act as it."""
    if issuer.tenant_id != consumer.tenant_id:
        raise ValidationError({"issuer_id": f"Unknown JWT issuer {issuer.pk!r} for this consumer's tenant."})
    _check_external_id(external_id)
    holder = (
        ConsumerIdentity.objects.filter(issuer=issuer, external_id=external_id)
        .values_list("consumer_id", flat=True)
        .first()
    )
    if holder is not None:
        whose = "This consumer already has" if holder == consumer.pk else "Another consumer already has"
        raise ValidationError({"external_id": f"{whose} external ID {external_id!r} at issuer {issuer.name!r}."})
    identity = ConsumerIdentity(consumer=consumer, issuer=issuer, external_id=external_id)
    _save_validated(identity)
    audit_record(
        actor=actor,
        tenant_id=consumer.tenant_id,
        action="consumer_identity.create",
        obj=identity,
        changes={"consumer_id": consumer.pk, "issuer_id": issuer.pk, "external_id": external_id},
    )
    identities_changed([(issuer.pk, external_id)])  # a cached "no such consumer" answer is dropped
    return identity


@transaction.atomic
def consumer_identity_delete(*, identity: ConsumerIdentity, actor: Actor) -> None:
    """Tokens with this identity's external ID stop acting as its consumer on every gateway within a second."""
    audit_record(
        actor=actor,
        tenant_id=identity.consumer.tenant_id,
        action="consumer_identity.delete",
        obj=identity,
        changes={
            "consumer_id": identity.consumer_id,
            "issuer_id": identity.issuer_id,
            "external_id": identity.external_id,
        },
    )
    identities_changed([(identity.issuer_id, identity.external_id)])
    identity.delete()


def consumer_identity_provision(*, issuer: JwtIssuer, external_id: str, api: Api | None = None) -> ConsumerIdentity:
    """For an issuer with ``auto_provision``: the identity of ``external_id``, made with a new consumer of the
    issuer's tenant when there is none yet. Safe to call from several processes at once (one wins, the others read
    its row). With ``api`` (the API the token was sent to), a new consumer is subscribed to it in the same
    transaction (``_provisioned_subscription``), so the winner's consumer is usable as soon as anyone reads it."""
    existing = (
        ConsumerIdentity.objects.select_related("consumer").filter(issuer=issuer, external_id=external_id).first()
    )
    if existing is not None:
        return existing
    if not issuer.auto_provision:
        raise ValidationError({"auto_provision": f"JWT issuer {issuer.name!r} does not provision consumers."})
    _check_external_id(external_id)
    base = f"{external_id[:70]} ({issuer.name[:25]})"
    try:
        with transaction.atomic():
            name = base
            if Consumer.objects.filter(tenant_id=issuer.tenant_id, owner__isnull=True, name=name).exists():
                name = f"{base[:90]} {ids.random_base62(6)}"
            consumer = consumer_create(
                tenant=issuer.tenant, name=name, actor=None, description="Provisioned from a JWT."
            )
            identity = consumer_identity_create(consumer=consumer, issuer=issuer, external_id=external_id, actor=None)
            if api is not None:
                _provisioned_subscription(consumer, api)
            return identity
    except (ValidationError, IntegrityError):
        # Another process provisioned it first: use theirs.
        won = ConsumerIdentity.objects.select_related("consumer").filter(issuer=issuer, external_id=external_id)
        theirs = won.first()
        if theirs is None:
            raise
        return theirs


def _provisioned_subscription(consumer: Consumer, api: Api) -> None:
    """A provisioned consumer's subscription to the API its first token was sent to: without a plan when the API
    offers none; else on its only open plan, or its only open plan with automatic approval. Approval follows the
    API and the plan as for any request (manual: pending until an admin approves). Several automatic plans: no
    subscription (nobody chose one for it); the gateway then answers 403 until someone subscribes it."""
    if api.tenant_id != consumer.tenant_id:
        return
    plans = list(api.plans.order_by("name"))
    open_plans = [plan for plan in plans if plan.archived_at is None]
    automatic = [plan for plan in open_plans if plan.approval == Plan.Approval.AUTO]
    plan: Plan | None = None
    if plans:
        if len(open_plans) == 1:
            plan = open_plans[0]
        elif len(automatic) == 1:
            plan = automatic[0]
        else:
            return
    try:
        with transaction.atomic():
            subscription_request(consumer=consumer, api=api, plan=plan, actor=None)
    except ValidationError:
        return  # the API takes no subscriptions now (retired, ...): the consumer stays, unsubscribed


def jwt_consumer_provision(*, issuer_id: str, external_id: str, api_id: str) -> ConsumerIdentity:
    """The gateway's auto-provisioning: a token of an ``auto_provision`` issuer whose consumer claim maps to no
    consumer gets one (and a subscription to the API it was sent to), as ``consumer_identity_provision`` does."""
    issuer = JwtIssuer.objects.select_related("tenant").get(pk=issuer_id)
    api = Api.objects.filter(pk=api_id, tenant_id=issuer.tenant_id).first()
    return consumer_identity_provision(issuer=issuer, external_id=external_id, api=api)


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


def subscription_plan_check(*, api: Api, plan: Plan | None) -> None:
    """An API that offers plans takes subscriptions only on one of them ("no plan" would escape their limits)."""
    offered = list(api.plans.order_by("name").values_list("pk", "name", "archived_at"))
    if not offered:
        return
    # Archived plans take no new subscriptions (refused with their own message): not suggested.
    names = ", ".join(name for _pk, name, archived_at in offered if archived_at is None) or "none open now"
    if plan is None:
        raise ValidationError({"plan_id": f"API {api.api_name!r} is offered on plans {names}: choose one of them."})
    if plan.pk not in {pk for pk, _name, _archived_at in offered}:
        raise ValidationError(
            {"plan_id": f"Plan {plan.name!r} is not offered for API {api.api_name!r}; choose one of: {names}."}
        )


def subscription_check(*, consumer: Consumer, api: Api, plan: Plan | None) -> None:
    """What subscription_request refuses: other tenants' objects, a plan the API does not offer (or none when it
    offers some), unroutable APIs, blocked consumers, duplicates."""
    if api.tenant_id != consumer.tenant_id:
        raise ValidationError({"api_id": "Unknown API for this consumer's tenant."})
    if plan is not None and plan.tenant_id != consumer.tenant_id:
        raise ValidationError({"plan_id": "Unknown plan for this consumer's tenant."})
    if plan is not None and plan.archived_at is not None:
        raise ValidationError({"plan_id": f"Plan {plan.name!r} is archived and takes no new subscriptions."})
    subscription_plan_check(api=api, plan=plan)
    if not api.routable:
        raise ValidationError(
            {"api_id": f"This API is {api.status}; only active or deprecated APIs accept subscriptions."}
        )
    if consumer.status != Consumer.Status.ACTIVE:
        raise ValidationError({"consumer_id": "This consumer is blocked."})
    if Subscription.objects.filter(consumer=consumer, api=api).open().exists():
        raise ValidationError({"api_id": "This consumer already has a pending or active subscription to this API."})


@transaction.atomic
def subscription_request(*, consumer: Consumer, api: Api, actor: Actor, plan: Plan | None = None) -> Subscription:
    """Ask for access. Auto-approved when both the API and the plan (if any) say so; else pending."""
    subscription_check(consumer=consumer, api=api, plan=plan)
    manual = api.subscription_approval == Api.Approval.MANUAL or (
        plan is not None and plan.approval == Plan.Approval.MANUAL
    )
    subscription = Subscription(
        consumer=consumer,
        api=api,
        plan=plan,
        status=Subscription.Status.PENDING if manual else Subscription.Status.ACTIVE,
    )
    if not manual:
        subscription.decided_at = timezone.now()
        subscription.decision_note = "approved automatically"
    _save_validated(subscription)
    audit_record(
        actor=actor,
        tenant_id=consumer.tenant_id,
        action="subscription.request",
        obj=subscription,
        changes={
            "consumer_id": consumer.pk,
            "api_id": api.pk,
            "plan_id": plan.pk if plan else None,
            "status": subscription.status,
        },
    )
    events.emit(
        tenant_id=consumer.tenant_id,
        event_type="subscription.requested",
        data=events.subscription_data(subscription),
    )
    if not manual:
        consumer_changed(consumer.pk)
    return subscription


_DECISION_EVENTS: dict[str, str] = {
    Subscription.Status.ACTIVE: "subscription.approved",
    Subscription.Status.REJECTED: "subscription.rejected",
    Subscription.Status.CANCELLED: "subscription.cancelled",
}


def _decide(
    *, subscription: Subscription, to: str, allowed_from: tuple[str, ...], actor: Actor, note: str, action: str
) -> Subscription:
    subscription = Subscription.objects.select_for_update().get(pk=subscription.pk)
    if subscription.status not in allowed_from:
        raise ValidationError({"status": f"A {subscription.status} subscription cannot become {to}."})
    old = subscription.status
    subscription.status = to
    subscription.decided_at = timezone.now()
    subscription.decided_by = actor if isinstance(actor, User) and actor.pk else None
    subscription.decision_note = note[:500]
    if to not in OPEN_SUBSCRIPTION_STATUSES:
        # A closed subscription moves nowhere: a scheduled plan change goes with it.
        subscription.pending_plan = None
        subscription.plan_change_at = None
    subscription.save(
        update_fields=["status", "decided_at", "decided_by", "decision_note", "pending_plan", "plan_change_at"]
    )
    audit_record(
        actor=actor,
        tenant_id=subscription.api.tenant_id,
        action=action,
        obj=subscription,
        changes={"status": [old, to], "note": note[:500]},
    )
    events.emit(
        tenant_id=subscription.api.tenant_id,
        event_type=_DECISION_EVENTS[to],
        data=events.subscription_data(subscription),
    )
    consumer_changed(subscription.consumer_id)
    return subscription


@transaction.atomic
def subscription_approve(*, subscription: Subscription, actor: Actor, note: str = "") -> Subscription:
    return _decide(
        subscription=subscription,
        to=Subscription.Status.ACTIVE,
        allowed_from=(Subscription.Status.PENDING,),
        actor=actor,
        note=note,
        action="subscription.approve",
    )


@transaction.atomic
def subscription_reject(*, subscription: Subscription, actor: Actor, note: str = "") -> Subscription:
    return _decide(
        subscription=subscription,
        to=Subscription.Status.REJECTED,
        allowed_from=(Subscription.Status.PENDING,),
        actor=actor,
        note=note,
        action="subscription.reject",
    )


@transaction.atomic
def subscription_cancel(*, subscription: Subscription, actor: Actor, note: str = "") -> Subscription:
    return _decide(
        subscription=subscription,
        to=Subscription.Status.CANCELLED,
        allowed_from=tuple(OPEN_SUBSCRIPTION_STATUSES),
        actor=actor,
        note=note,
        action="subscription.cancel",
    )


# ---------------------------------------------------------------------------
# Plan changes and archived plans
# ---------------------------------------------------------------------------

PLAN_CHANGE_EFFECTIVE = ("now", "next_period")


def plan_change_boundary(*, plan: Plan | None, tz_name: str, now: datetime) -> datetime:
    """When a next-period change takes effect: the start of the next calendar quota window in the tenant's zone
    (a month when the current plan has a monthly quota, else a day)."""
    label = "day"
    if plan is not None:
        for policy in plan.policies.all():
            if policy.policy_type == Policy.Type.QUOTA and policy.config.get("requests_per_month"):
                label = "month"
    _start, end = limits.calendar_bounds(label, tz_name, now.timestamp())
    return datetime.fromtimestamp(end, tz=UTC)


def _counted_windows(subscription: Subscription, plan: Plan | None, now: float) -> dict[tuple[str, str], list[Any]]:
    """The calendar counters (quota days and months, fixed rate windows) ``plan`` counts this subscription's
    traffic under, by (window label, scope value). Only counters owned by the consumer or its keys: a counter shared
    by an API, a tenant or an address is everyone's and carries over as it is."""
    found: dict[tuple[str, str], list[Any]] = {}
    if plan is None:
        return found
    windows = events.owned_counter_windows(
        subscription,
        plan.policies.all(),
        now,
        lambda: list(subscription.consumer.keys.live().values_list("pk", flat=True)),
    )
    for window, _scope, value in windows:
        if not window.sliding:
            found.setdefault((window.label, value), []).append(window)
    return found


# Quota carry-over runs twice per change. At commit (carry_over_quota) the new plan's counters are raised to what the
# old plan's hold, and those source values are kept in a hash of the change (plan_carry:{<tenant>}:<event id>, the
# tenant's slot like the counters). Once every gateway follows the change (PLAN_CARRY_SETTLE_SECONDS after it), the
# deliverer's second pass (plan_carry_over_complete) adds what the old counters gained meanwhile: the requests that
# gateways still on the old plan counted there. A marker per window in the same hash, set in the same script, makes
# that pass happen once however often it is retried, and a done key (plan_carry:{<tenant>}:<event id>:done) says the
# whole change is complete. The deliverer finds the changes to complete in the database, not in a Redis queue: a
# change whose first pass failed with Redis down must still be completed once Redis is back.
PLAN_CARRY_SETTLE_SECONDS = 5.0
# A second pass later than this after it was due (a deliverer that was down or behind, a one-shot run from cron)
# cannot tell the lagging gateways' requests from what the old counters counted since for other reasons; it only
# raises the new counters to the old ones, which never counts a request twice.
PLAN_CARRY_LATE_SECONDS = 60.0
# How far back the deliverer looks for changes not yet complete. A change's hash and done key live as long after
# they were last written, so a change the deliverer still looks at never loses them.
PLAN_CARRY_LOOKBACK = timedelta(days=2)
PLAN_CARRY_TTL_SECONDS = int(PLAN_CARRY_LOOKBACK.total_seconds())

_carry_logger = logging.getLogger(__name__)

# KEYS: the change's hash, then ARGV[1] old-plan counters, then the new plan's counters of the same window and scope.
# Records each old counter's value (the first time) and raises each new counter to the largest, never lowering it;
# the new counters keep the gateway's expiry (ARGV[2]: window end + 60 s, ms). Returns how many were raised.
_CARRY_OVER_SCRIPT = """
local sources = tonumber(ARGV[1])
local used = 0
for i = 2, sources + 1 do
  local value = tonumber(redis.call('GET', KEYS[i]) or '0')
  redis.call('HSETNX', KEYS[1], KEYS[i], value)
  if value > used then used = value end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local raised = 0
for i = sources + 2, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used > current then
    redis.call('INCRBY', KEYS[i], used - current)
    redis.call('PEXPIREAT', KEYS[i], ARGV[2])
    raised = raised + 1
  end
end
return raised
"""

# The second pass, same KEYS and ARGV, ARGV[4] naming the (window, scope) it completes. Once only (HSETNX of that
# marker): each new counter gains the most any old counter gained since the first pass. Only the first ARGV[5] old
# counters count for that: the others are counters the new plan shares (the same policy), whose growth is mostly
# the new plan's own traffic, already on the new counters. Without a first pass (Redis was down at commit, or the
# window began since) or when late (ARGV[6] = 1), the new counters are raised to the old ones instead, as the first
# pass does. Returns how many counters it changed, or -1 when this pass already ran.
_CARRY_OVER_COMPLETE_SCRIPT = """
if redis.call('HSETNX', KEYS[1], ARGV[4], '1') == 0 then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local sources, own = tonumber(ARGV[1]), tonumber(ARGV[5])
local gained, used, recorded = 0, 0, false
for i = 2, sources + 1 do
  local value = tonumber(redis.call('GET', KEYS[i]) or '0')
  local first = redis.call('HGET', KEYS[1], KEYS[i])
  if first then
    recorded = true
    if i <= own + 1 and value - tonumber(first) > gained then gained = value - tonumber(first) end
  end
  if value > used then used = value end
end
local changed = 0
for i = sources + 2, #KEYS do
  local add = gained
  if ARGV[6] == '1' or not recorded then add = used - tonumber(redis.call('GET', KEYS[i]) or '0') end
  if add > 0 then
    redis.call('INCRBY', KEYS[i], add)
    redis.call('PEXPIREAT', KEYS[i], ARGV[2])
    changed = changed + 1
  end
end
return changed
"""


def _carry_key(tenant_id: str, event_id: str) -> str:
    from apimgmt.redis_client import tenant_tag

    return f"{tenant_tag('plan_carry', tenant_id)}:{event_id}"


def _carry_done_key(tenant_id: str, event_id: str) -> str:
    return f"{_carry_key(tenant_id, event_id)}:done"


def _carry_slots(
    subscription: Subscription, old_plan: Plan, new_plan: Plan, at: float
) -> Iterator[tuple[str, list[str], int, list[Any]]]:
    """Per (window label, scope value) that both plans count at ``at``: its marker name; the old plan's counter keys,
    first those the new plan does not count, then those it shares (a policy both plans have is the same counter),
    with how many are of the first kind; and the new plan's windows whose counters are not among them."""
    old = _counted_windows(subscription, old_plan, at)
    for slot, windows in _counted_windows(subscription, new_plan, at).items():
        counted = {w.key for w in windows}
        sources = [w.key for w in old.get(slot, [])]
        own = [key for key in sources if key not in counted]
        fresh = [w for w in windows if w.key not in sources]
        if sources and fresh:
            yield f"done:{slot[0]}:{slot[1]}", own + [key for key in sources if key in counted], len(own), fresh


def carry_over_quota(
    *,
    subscription: Subscription,
    old_plan: Plan | None,
    new_plan: Plan | None,
    event_id: str,
    at: datetime | None = None,
) -> int:
    """Count what the old plan's calendar counters hold for the window of ``at`` (default: now, the time of this
    pass, so a change committed just after a window began carries into the new window) on the new plan's matching
    counters (same window label, same consumer or key), so quota used in the current window is not granted again.

    A counter both plans share (the same policy) is already the same key. Counters of the new plan are raised to
    at least the old value, never lowered, so switching back and forth within a window never forgets traffic. The
    old values are recorded under ``event_id`` (the change's subscription.plan_changed) for the deliverer's second
    pass, plan_carry_over_complete. Returns how many counters were raised. Without Redis there are no shared
    counters: nothing to carry.
    """
    from apimgmt.redis_client import get_redis

    client = get_redis()
    if client is None or old_plan is None or new_plan is None:
        return 0
    moment = (at or timezone.now()).timestamp()
    carry = _carry_key(subscription.api.tenant_id, event_id)
    raised = 0
    for _marker, sources, _own, targets in _carry_slots(subscription, old_plan, new_plan, moment):
        raised += int(
            client.eval(
                _CARRY_OVER_SCRIPT,
                1 + len(sources) + len(targets),
                carry,
                *sources,
                *[w.key for w in targets],
                len(sources),
                int(targets[0].end * 1000) + 60000,
                PLAN_CARRY_TTL_SECONDS * 1000,
            )
        )
    return raised


def _carry_over_after_commit(subscription: Subscription, old_plan: Plan | None, new_plan: Plan, event: Event) -> None:
    """The first carry-over pass, run once the change committed. A Redis failure must not fail the request (the
    change is committed by now): it is logged, and the deliverer's second pass carries the quota over instead."""
    from redis.exceptions import RedisClusterException, RedisError

    try:
        carry_over_quota(subscription=subscription, old_plan=old_plan, new_plan=new_plan, event_id=event.pk)
    except (RedisError, RedisClusterException) as exc:  # never a 500 for a committed change
        _carry_logger.warning(
            "quota carry-over of subscription %s to plan %s failed (%s: %s); the event deliverer carries it over",
            subscription.pk,
            new_plan.pk,
            exc.__class__.__name__,
            exc,
        )


def plan_carry_over_complete(
    *, client: Any, now: datetime | None = None, batch_size: int = 200, done: set[str] | None = None
) -> int:
    """The second carry-over pass of every plan change of the last PLAN_CARRY_LOOKBACK that is due (see
    PLAN_CARRY_SETTLE_SECONDS) and not complete; return how many counters it changed.

    The changes are the subscription.plan_changed events (an index covers exactly them), so a change is completed
    whatever Redis did when it committed. Safe in several deliverers at once and when retried: each (change, window,
    scope) is completed once, by its marker, and a complete change has a done key. ``done``, kept by the caller
    from one call to the next, holds the changes it already saw complete, so only new ones are looked up in Redis.

    A change followed by another of the same subscription is not completed: the later change's passes carry what
    was counted, and this one's would count the later change's carried quota a second time. The windows are those
    of now: a window that ended since the change is done counting.
    """
    moment = now or timezone.now()
    seen = done if done is not None else set()
    due_by = moment - timedelta(seconds=PLAN_CARRY_SETTLE_SECONDS)
    # Oldest first, as plain text and a flag: read every few seconds, so no JSON or timestamp is decoded per row.
    recent = list(
        Event.objects.filter(event_type="subscription.plan_changed", occurred_at__gte=moment - PLAN_CARRY_LOOKBACK)
        .annotate(
            subscription_id=models.fields.json.KT("data__subscription_id"),
            due=models.ExpressionWrapper(models.Q(occurred_at__lte=due_by), output_field=models.BooleanField()),
        )
        .order_by("occurred_at", "pk")
        .values_list("pk", "tenant_id", "subscription_id", "due")
    )
    seen.intersection_update(pk for pk, *_rest in recent)
    latest = {subscription_id: pk for pk, _tenant, subscription_id, _due in recent}
    candidates = {
        _carry_done_key(tenant_id, pk): (pk, tenant_id) for pk, tenant_id, _sub, due in recent if due and pk not in seen
    }
    pending: list[tuple[str, str]] = []
    for batch in events.mget_batches(client, list(candidates), batch_size):
        for key, marker in zip(batch, client.mget(batch), strict=True):
            if marker is None:
                pending.append(candidates[key])
            else:
                seen.add(candidates[key][0])
    order = {pk: index for index, (pk, *_rest) in enumerate(recent)}
    changed = 0
    from redis.exceptions import RedisClusterException, RedisError

    for event_id, tenant_id in sorted(pending, key=lambda change: order[change[0]])[:batch_size]:
        event = Event.objects.filter(pk=event_id).first()
        if event is not None and latest.get(event.data.get("subscription_id")) == event_id:
            late = (moment - event.occurred_at).total_seconds() - PLAN_CARRY_SETTLE_SECONDS > PLAN_CARRY_LATE_SECONDS
            try:
                changed += _complete_change(event, client=client, at=moment, late=late)
            except (RedisError, RedisClusterException, DatabaseError):
                raise  # Redis or the database is unwell: the whole scan backs off and comes back to this change
            except Exception:
                # Anything else is this change's own (a bug, a row of an unexpected shape): it is logged and set
                # aside, else it would fail first in every scan and hold up every later change for two days.
                _carry_logger.exception("plan carry-over of event %s failed and was skipped", event_id)
        client.set(_carry_done_key(tenant_id, event_id), 1, ex=PLAN_CARRY_TTL_SECONDS)
        seen.add(event_id)
    return changed


def _complete_change(event: Event, *, client: Any, at: datetime, late: bool) -> int:
    """One change's second pass (see plan_carry_over_complete) in the windows of ``at``; how many counters changed."""
    data = event.data
    subscription = (
        Subscription.objects.select_related("api", "consumer__tenant").filter(pk=data.get("subscription_id")).first()
    )
    plans = Plan.objects.in_bulk([data.get("previous_plan_id"), data.get("plan_id")])
    old_plan, new_plan = plans.get(data.get("previous_plan_id")), plans.get(data.get("plan_id"))
    if subscription is None or old_plan is None or new_plan is None:
        return 0
    carry = _carry_key(event.tenant_id, event.pk)
    changed, completed = 0, 0
    for marker, sources, own, targets in _carry_slots(subscription, old_plan, new_plan, at.timestamp()):
        result = int(
            client.eval(
                _CARRY_OVER_COMPLETE_SCRIPT,
                1 + len(sources) + len(targets),
                carry,
                *sources,
                *[w.key for w in targets],
                len(sources),
                int(targets[0].end * 1000) + 60000,
                PLAN_CARRY_TTL_SECONDS * 1000,
                marker,
                own,
                1 if late else 0,
            )
        )
        completed += result >= 0
        changed += max(0, result)
    if late and completed:
        _carry_logger.warning(
            "quota carry-over of plan change %s (subscription %s) completed %.0f s after the change, too late to "
            "tell requests of gateways still on the old plan from other traffic: the new plan's counters were "
            "raised to the old plan's (%d changed), not given what the old ones gained since",
            event.pk,
            subscription.pk,
            (at - event.occurred_at).total_seconds(),
            changed,
        )
    return changed


def _plan_change_check(*, subscription: Subscription, plan: Plan) -> None:
    if plan.tenant_id != subscription.api.tenant_id:
        raise ValidationError({"plan_id": "Unknown plan for this subscription's tenant."})
    if plan.archived_at is not None:
        raise ValidationError({"plan_id": f"Plan {plan.name!r} is archived and takes no new subscriptions."})
    if subscription.status not in OPEN_SUBSCRIPTION_STATUSES:
        raise ValidationError({"status": f"A {subscription.status} subscription cannot change plan."})
    if plan.pk == subscription.plan_id:
        raise ValidationError({"plan_id": f"The subscription is already on plan {plan.name!r}."})
    subscription_plan_check(api=subscription.api, plan=plan)


def _apply_plan_change(*, subscription: Subscription, actor: Actor, effective: str) -> Subscription:
    """Move a locked subscription to its pending plan: audited, event emitted, keys re-read by every gateway, and
    (after commit) the quota already used in this window carried over."""
    old_plan, new_plan = subscription.plan, subscription.pending_plan
    assert new_plan is not None
    subscription.plan = new_plan
    subscription.pending_plan = None
    scheduled_at = subscription.plan_change_at
    subscription.plan_change_at = None
    subscription.save(update_fields=["plan", "pending_plan", "plan_change_at"])
    changes = {"plan_id": [old_plan.pk if old_plan else None, new_plan.pk], "effective": effective}
    tenant_id = subscription.api.tenant_id
    audit_record(actor=actor, tenant_id=tenant_id, action="subscription.change_plan", obj=subscription, changes=changes)
    event = events.emit(
        tenant_id=tenant_id,
        event_type="subscription.plan_changed",
        data=events.subscription_data(
            subscription,
            previous_plan_id=old_plan.pk if old_plan else None,
            effective=effective,
            effective_at=_json_value(scheduled_at or timezone.now()),
        ),
    )
    assert event is not None  # no dedupe key: always written
    consumer_changed(subscription.consumer_id)
    transaction.on_commit(lambda: _carry_over_after_commit(subscription, old_plan, new_plan, event))
    return subscription


@transaction.atomic
def subscription_change_plan(
    *, subscription: Subscription, plan: Plan, actor: Actor, effective: str = "now"
) -> Subscription:
    """Move a subscription to another plan without re-keying.

    ``now``: the new plan's limits apply within a second; quota already used in the current window carries over.
    ``next_period``: the change waits for the start of the next calendar quota window in the tenant's zone
    (``plan_change_at``), then ``deliver_events`` applies it; until then ``pending_plan`` shows it, and a new
    change or a cancellation replaces it.
    """
    if effective not in PLAN_CHANGE_EFFECTIVE:
        raise ValidationError({"effective": f"effective must be one of {', '.join(PLAN_CHANGE_EFFECTIVE)}."})
    subscription = (
        Subscription.objects.select_for_update(of=("self",))
        .select_related("api", "plan", "consumer__tenant")
        .get(pk=subscription.pk)
    )
    _plan_change_check(subscription=subscription, plan=plan)
    if effective == "next_period" and subscription.status != Subscription.Status.ACTIVE:
        raise ValidationError({"effective": "Only an active subscription can change plan at the next period."})
    subscription.pending_plan = plan
    if effective == "now":
        return _apply_plan_change(subscription=subscription, actor=actor, effective=effective)
    subscription.plan_change_at = plan_change_boundary(
        plan=subscription.plan, tz_name=subscription.consumer.tenant.timezone, now=timezone.now()
    )
    subscription.save(update_fields=["pending_plan", "plan_change_at"])
    audit_record(
        actor=actor,
        tenant_id=subscription.api.tenant_id,
        action="subscription.schedule_plan_change",
        obj=subscription,
        changes={"plan_id": [subscription.plan_id, plan.pk], "effective_at": subscription.plan_change_at},
    )
    return subscription


@transaction.atomic
def subscription_request_plan_change(*, subscription: Subscription, plan: Plan, actor: Actor) -> Subscription:
    """A developer asks to move their subscription to another plan. A plan that takes subscriptions automatically
    takes the move too (applied now, quota carried over); one that needs approval records the request
    (``pending_plan`` without ``plan_change_at``) for a tenant admin, who approves it with
    ``subscription_change_plan`` or drops it by cancelling or by another change."""
    subscription = (
        Subscription.objects.select_for_update(of=("self",))
        .select_related("api", "plan", "consumer__tenant")
        .get(pk=subscription.pk)
    )
    _plan_change_check(subscription=subscription, plan=plan)
    subscription.pending_plan = plan
    subscription.plan_change_at = None
    if plan.approval == Plan.Approval.AUTO and subscription.api.subscription_approval == Api.Approval.AUTO:
        return _apply_plan_change(subscription=subscription, actor=actor, effective="now")
    subscription.save(update_fields=["pending_plan", "plan_change_at"])
    audit_record(
        actor=actor,
        tenant_id=subscription.api.tenant_id,
        action="subscription.request_plan_change",
        obj=subscription,
        changes={"plan_id": [subscription.plan_id, plan.pk]},
    )
    return subscription


def subscription_apply_due_plan_changes(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """Apply scheduled plan changes whose time has come (run by ``deliver_events``; safe in several processes)."""
    moment = now or timezone.now()
    applied = 0
    while True:
        with transaction.atomic():
            due = list(
                Subscription.objects.filter(pending_plan__isnull=False, plan_change_at__lte=moment)
                .select_for_update(skip_locked=True, of=("self",))
                .select_related("api", "plan", "pending_plan", "consumer__tenant")[:batch_size]
            )
            for subscription in due:
                _apply_plan_change(subscription=subscription, actor=None, effective="next_period")
        applied += len(due)
        if len(due) < batch_size:
            return applied


@transaction.atomic
def plan_archive(*, plan: Plan, actor: Actor) -> Plan:
    """No new subscriptions (nor plan changes) to an archived plan; its subscriptions keep it until moved."""
    plan = Plan.objects.select_for_update().get(pk=plan.pk)
    if plan.archived_at is None:
        plan.archived_at = timezone.now()
        plan.save(update_fields=["archived_at", "updated_at"])
        audit_record(actor=actor, tenant_id=plan.tenant_id, action="plan.archive", obj=plan, changes={"archived": True})
    return plan


@transaction.atomic
def plan_unarchive(*, plan: Plan, actor: Actor) -> Plan:
    plan = Plan.objects.select_for_update().get(pk=plan.pk)
    if plan.archived_at is not None:
        plan.archived_at = None
        plan.save(update_fields=["archived_at", "updated_at"])
        audit_record(
            actor=actor, tenant_id=plan.tenant_id, action="plan.unarchive", obj=plan, changes={"archived": False}
        )
    return plan
