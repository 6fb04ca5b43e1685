"""Management API viewsets: parse, check scope (permissions.restrict), call a service, render."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Max, Model, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apimgmt import services
from apimgmt.api import serializers as s
from apimgmt.api.exceptions import PROBLEM_CONTENT_TYPE
from apimgmt.api.filters import FieldFilterBackend, StrictOrderingFilter
from apimgmt.api.permissions import (
    CHANGE,
    DECIDE,
    STAFF,
    VIEW,
    may_act_on,
    may_create,
    restrict,
    roles_of,
    sees_internals,
)
from apimgmt.api.policy_schema import typed_policy
from apimgmt.client_address import client_address_of
from apimgmt.context import accept_request_id, client_ip_var, request_id_var
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
    UsageDailyTotal,
    UsageHourly,
    UsageHourlyTotal,
    UsageRecord,
)
from apimgmt.selectors import is_platform_staff

ID_REGEX = r"[A-Za-z0-9_-]{1,64}"


def _client_ip(request: HttpRequest) -> str | None:
    # The one rule for every part of the product (apimgmt.client_address): X-Forwarded-For only via TRUSTED_PROXIES.
    return client_address_of(request.META) or None


class RequestContextMixin:
    """Bind the request id and client IP for the services' audit events, unless a middleware already did."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        resets = []
        if request_id_var.get() is None:
            rid = accept_request_id(request.META.get("HTTP_X_REQUEST_ID"))
            resets.append((request_id_var, request_id_var.set(rid)))
        if client_ip_var.get() is None:
            resets.append((client_ip_var, client_ip_var.set(_client_ip(request))))
        try:
            response = super().dispatch(request, *args, **kwargs)  # type: ignore[misc]
            response["X-Request-ID"] = request_id_var.get() or ""
            return response
        finally:
            for var, token in reversed(resets):
                var.reset(token)


class ScopedViewSet(RequestContextMixin, viewsets.GenericViewSet):
    """Base of every resource: rows come through ``restrict`` and detail writes check the action once, here."""

    queryset: QuerySet[Any]
    filter_backends = [FieldFilterBackend, StrictOrderingFilter]
    filter_fields: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    lookup_value_regex = ID_REGEX
    # DRF action -> permission action; unsafe actions not listed need CHANGE.
    action_permissions: dict[str, str] = {}

    def get_queryset(self) -> QuerySet[Any]:
        if getattr(self, "swagger_fake_view", False):
            return self.queryset.none()
        return restrict(self.queryset.all(), self.request.user, VIEW)

    def required_permission(self) -> str:
        if self.request.method in SAFE_METHODS:
            return VIEW
        return self.action_permissions.get(self.action or "", CHANGE)

    def get_object(self) -> Any:
        obj = super().get_object()
        needed = self.required_permission()
        if needed != VIEW and not may_act_on(self.request.user, obj, needed):
            raise exceptions.PermissionDenied(f"Your role does not allow this on {obj._meta.verbose_name} {obj.pk}.")
        return obj

    # Helpers shared by the resources -------------------------------------------------------

    def tenant_for_create(self, model: type[Model], tenant_id: str) -> Tenant:
        tenant = restrict(Tenant.objects.all(), self.request.user, VIEW).filter(pk=tenant_id).first()
        if tenant is None:
            raise exceptions.ValidationError({"tenant_id": [f"Unknown tenant {tenant_id!r}."]})
        if not may_create(self.request.user, model, tenant.id):
            raise exceptions.PermissionDenied(
                f"Your role in tenant {tenant.id} does not allow creating {model._meta.verbose_name_plural}."
            )
        return tenant

    def consumer_for_write(self, consumer_id: str) -> Consumer:
        consumer = restrict(Consumer.objects.all(), self.request.user, VIEW).filter(pk=consumer_id).first()
        if consumer is None:
            raise exceptions.ValidationError({"consumer_id": [f"Unknown consumer {consumer_id!r}."]})
        if not may_act_on(self.request.user, consumer, CHANGE):
            raise exceptions.PermissionDenied(f"Your role does not allow managing consumer {consumer.pk}.")
        return consumer

    @staticmethod
    def policies_of(tenant_id: str, ids: Iterable[str]) -> list[Policy]:
        wanted = list(dict.fromkeys(ids))
        found = {p.pk: p for p in Policy.objects.filter(tenant_id=tenant_id, pk__in=wanted)}
        missing = [pk for pk in wanted if pk not in found]
        if missing:
            raise exceptions.ValidationError({"policies": [f"Unknown policies for this tenant: {', '.join(missing)}."]})
        return [found[pk] for pk in wanted]

    @staticmethod
    def issuers_of(tenant_id: str, ids: Iterable[str]) -> list[JwtIssuer]:
        wanted = list(dict.fromkeys(ids))
        found = {i.pk: i for i in JwtIssuer.objects.filter(tenant_id=tenant_id, pk__in=wanted)}
        missing = [pk for pk in wanted if pk not in found]
        if missing:
            raise exceptions.ValidationError(
                {"jwt_issuers": [f"Unknown JWT issuers for this tenant: {', '.join(missing)}."]}
            )
        return [found[pk] for pk in wanted]

    @staticmethod
    def plans_of(tenant_id: str, ids: Iterable[str]) -> list[Plan]:
        wanted = list(dict.fromkeys(ids))
        found = {p.pk: p for p in Plan.objects.filter(tenant_id=tenant_id, pk__in=wanted)}
        missing = [pk for pk in wanted if pk not in found]
        if missing:
            raise exceptions.ValidationError({"plans": [f"Unknown plans for this tenant: {', '.join(missing)}."]})
        return [found[pk] for pk in wanted]

    def validated(self, serializer_class: type[Any], *, instance: Any = None, partial: bool = False) -> dict[str, Any]:
        serializer = serializer_class(instance, data=self.request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        for name in getattr(serializer, "create_only_fields", ()):
            if instance is not None:
                data.pop(name, None)
        return data

    def render(self, obj: Any, code: int = status.HTTP_200_OK, serializer_class: type[Any] | None = None) -> Response:
        return Response((serializer_class or self.get_serializer_class())(obj).data, status=code)

    @property
    def actor(self) -> Any:
        return self.request.user


class ReadMixin(mixins.ListModelMixin, mixins.RetrieveModelMixin):
    pass


def destroy_schema(summary: str, conflict: str) -> Any:
    """204 on success; 409 (problem+json) when the object is still in use."""
    return extend_schema(
        summary=summary,
        responses={
            204: OpenApiResponse(description="Deleted."),
            (409, PROBLEM_CONTENT_TYPE): OpenApiResponse(response=s.ProblemSerializer, description=conflict),
        },
    )


class UpdateMixin(mixins.UpdateModelMixin):
    """PUT replaces the writable fields, PATCH changes some; both through ``perform_service_update``."""

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        partial = kwargs.pop("partial", False)
        obj = self.get_object()  # type: ignore[attr-defined]
        data = self.validated(self.get_serializer_class(), instance=obj, partial=partial)  # type: ignore[attr-defined]
        with transaction.atomic():
            updated = self.perform_service_update(obj, data)
        return self.render(self.get_queryset().get(pk=updated.pk))  # type: ignore[attr-defined]

    # Each viewset using this mixin supplies it: the service call that applies ``data`` to ``obj``.
    perform_service_update: Callable[[Any, dict[str, Any]], Any]


# ---------------------------------------------------------------------------
# Tenants
# ---------------------------------------------------------------------------


@extend_schema_view(
    create=extend_schema(summary="Create a tenant (platform staff only)"),
    suspend=extend_schema(request=None, summary="Suspend a tenant: its APIs stop routing (staff only)"),
    activate=extend_schema(request=None, summary="Re-activate a suspended tenant (staff only)"),
)
class TenantViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin):
    """Tenants: everyone sees theirs, admins rename theirs, platform staff create, suspend and activate."""

    queryset = Tenant.objects.all()
    serializer_class = s.TenantSerializer
    lookup_value_regex = r"[a-z0-9-]{1,63}"
    filter_fields = {"status": ("status", tuple(Tenant.Status.values))}
    ordering_fields = ["id", "name", "created_at"]
    ordering = ["id"]
    action_permissions = {"suspend": STAFF, "activate": STAFF}
    http_method_names = ["get", "post", "put", "patch", "head", "options"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not is_platform_staff(request.user):
            raise exceptions.PermissionDenied("Only platform staff can create tenants.")
        data = self.validated(s.TenantSerializer)
        tenant = services.tenant_create(
            id=data["id"],
            name=data["name"],
            actor=self.actor,
            timezone_name=data.get("timezone", "UTC"),
            open_signup=data.get("open_signup", False),
        )
        return self.render(tenant, status.HTTP_201_CREATED)

    def perform_service_update(self, obj: Tenant, data: dict[str, Any]) -> Tenant:
        return services.tenant_update(tenant=obj, actor=self.actor, **data)

    @action(detail=True, methods=["post"])
    def suspend(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        return self.render(services.tenant_suspend(tenant=self.get_object(), actor=self.actor))

    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        return self.render(services.tenant_activate(tenant=self.get_object(), actor=self.actor))


# ---------------------------------------------------------------------------
# Policies and plans
# ---------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(responses=typed_policy(many=True)),
    retrieve=extend_schema(responses=typed_policy()),
    create=extend_schema(request=typed_policy(), responses={201: typed_policy()}),
    update=extend_schema(request=typed_policy(), responses=typed_policy()),
    partial_update=extend_schema(request=s.PolicySerializer, responses=typed_policy()),
    destroy=destroy_schema("Delete a policy no API or plan uses", "APIs or plans still use the policy (named)."),
)
class PolicyViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin, mixins.DestroyModelMixin):
    """Policies of every type (docs/policies.md); `config` is validated per `policy_type`. CORS, request limits and
    response caches attach to APIs only, one of each per API."""

    queryset = Policy.objects.all()
    serializer_class = s.PolicySerializer
    filter_fields = {
        "tenant_id": ("tenant_id", None),
        "policy_type": ("policy_type", tuple(Policy.Type.values)),
        "mode": ("mode", tuple(Policy.Mode.values)),
    }
    ordering_fields = ["name", "created_at", "updated_at"]
    ordering = ["tenant_id", "name"]
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.PolicySerializer)
        tenant = self.tenant_for_create(Policy, data.pop("tenant_id"))
        policy = services.policy_create(tenant=tenant, actor=self.actor, **data)
        return self.render(policy, status.HTTP_201_CREATED)

    def perform_service_update(self, obj: Policy, data: dict[str, Any]) -> Policy:
        return services.policy_update(policy=obj, actor=self.actor, **data)

    def perform_destroy(self, instance: Policy) -> None:
        services.policy_delete(policy=instance, actor=self.actor)


@extend_schema_view(
    destroy=destroy_schema("Delete a plan no subscription references", "Subscriptions still reference the plan."),
)
class PlanViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin, mixins.DestroyModelMixin):
    """Plans: the policies subscribers get and whether subscribing needs approval."""

    queryset = Plan.objects.prefetch_related("policies")
    serializer_class = s.PlanSerializer
    filter_fields = {"tenant_id": ("tenant_id", None), "approval": ("approval", tuple(Plan.Approval.values))}
    ordering_fields = ["name", "created_at", "updated_at"]
    ordering = ["tenant_id", "name"]
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.PlanSerializer)
        tenant = self.tenant_for_create(Plan, data.pop("tenant_id"))
        policies = self.policies_of(tenant.id, data.pop("policies", []))
        plan = services.plan_create(tenant=tenant, actor=self.actor, policies=policies, **data)
        return self.render(self.get_queryset().get(pk=plan.pk), status.HTTP_201_CREATED)

    def perform_service_update(self, obj: Plan, data: dict[str, Any]) -> Plan:
        ids = data.pop("policies", None)
        policies = self.policies_of(obj.tenant_id, ids) if ids is not None else None
        return services.plan_update(plan=obj, actor=self.actor, policies=policies, **data)

    def perform_destroy(self, instance: Plan) -> None:
        services.plan_delete(plan=instance, actor=self.actor)


# ---------------------------------------------------------------------------
# APIs
# ---------------------------------------------------------------------------


def _targets(items: list[dict[str, Any]] | None) -> list[tuple[str, int]] | None:
    """Validated targets (s.TargetSerializer: url always present) as the services take them."""
    if items is None:
        return None
    return [(item["url"], item.get("weight", 1)) for item in items]


def _api_or_catalog_entry(many: bool = False) -> PolymorphicProxySerializer:
    return PolymorphicProxySerializer(
        component_name="ApiOrCatalogEntry",
        serializers=[s.ApiSerializer, s.ApiCatalogSerializer],
        resource_type_field_name=None,
        many=many,
    )


_AS_SEEN = (
    "Tenant admins, viewers and platform staff get the full API; developers get its catalog entry (no upstreams, "
    "targets, key settings or other internals)."
)


@extend_schema_view(
    list=extend_schema(responses=_api_or_catalog_entry(many=True), description=_AS_SEEN),
    retrieve=extend_schema(responses=_api_or_catalog_entry(), description=_AS_SEEN),
    activate=extend_schema(request=None, summary="Publish: the gateway routes it within a second"),
    deprecate=extend_schema(request=s.ApiDeprecateSerializer, summary="Deprecate (still routed, Deprecation header)"),
    retire=extend_schema(request=None, summary="Retire for good: stops routing, open subscriptions cancelled"),
    destroy=destroy_schema(
        "Delete a draft or retired API with its subscriptions (usage history stays)",
        "The API is active or deprecated: retire it first.",
    ),
)
class ApiViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin, mixins.DestroyModelMixin):
    """APIs published through the gateway; status changes through activate, deprecate and retire."""

    queryset = Api.objects.prefetch_related("policies", "plans", "targets", "jwt_issuers")
    serializer_class = s.ApiSerializer
    filter_fields = {
        "tenant_id": ("tenant_id", None),
        "status": ("status", tuple(Api.Status.values)),
        "visibility": ("visibility", tuple(Api.Visibility.values)),
    }
    ordering_fields = ["api_name", "base_path", "status", "created_at", "updated_at"]
    ordering = ["tenant_id", "api_name"]
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]

    _TRANSITIONS = {
        Api.Status.ACTIVE: services.api_activate,
        Api.Status.DEPRECATED: services.api_deprecate,
        Api.Status.RETIRED: services.api_retire,
    }

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.ApiSerializer)
        tenant = self.tenant_for_create(Api, data.pop("tenant_id"))
        policies = self.policies_of(tenant.id, data.pop("policies", []))
        plans = self.plans_of(tenant.id, data.pop("plans", []))
        issuers = self.issuers_of(tenant.id, data.pop("jwt_issuers", []))
        targets = _targets(data.pop("targets", None)) or []
        api = services.api_create(
            tenant=tenant,
            actor=self.actor,
            policies=policies,
            plans=plans,
            targets=targets,
            jwt_issuers=issuers,
            **data,
        )
        return self.render(self.get_queryset().get(pk=api.pk), status.HTTP_201_CREATED)

    def perform_service_update(self, obj: Api, data: dict[str, Any]) -> Api:
        new_status = data.pop("status", obj.status)
        ids = data.pop("policies", None)
        policies = self.policies_of(obj.tenant_id, ids) if ids is not None else None
        plan_ids = data.pop("plans", None)
        plans = self.plans_of(obj.tenant_id, plan_ids) if plan_ids is not None else None
        issuer_ids = data.pop("jwt_issuers", None)
        issuers = self.issuers_of(obj.tenant_id, issuer_ids) if issuer_ids is not None else None
        api = services.api_update(
            api=obj,
            actor=self.actor,
            policies=policies,
            plans=plans,
            jwt_issuers=issuers,
            targets=_targets(data.pop("targets", None)),
            **data,
        )
        if new_status != api.status:
            transition = self._TRANSITIONS.get(new_status)
            if transition is None:
                raise exceptions.ValidationError({"status": [f"An API that is {api.status} cannot go back to draft."]})
            api = transition(api=api, actor=self.actor)
        return api

    def perform_destroy(self, instance: Api) -> None:
        services.api_delete(api=instance, actor=self.actor)

    def as_seen_by_caller(self, api: Api) -> Any:
        """The full API for those who see the tenant's internals, the catalog entry for developers."""
        full = sees_internals(self.request.user, api.tenant_id)
        return (s.ApiSerializer if full else s.ApiCatalogSerializer)(api).data

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        if page is None:
            return Response([self.as_seen_by_caller(api) for api in queryset])
        return self.get_paginated_response([self.as_seen_by_caller(api) for api in page])

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(self.as_seen_by_caller(self.get_object()))

    def render(self, obj: Any, code: int = status.HTTP_200_OK, serializer_class: type[Any] | None = None) -> Response:
        if serializer_class is None and isinstance(obj, Api):
            return Response(self.as_seen_by_caller(obj), status=code)
        return super().render(obj, code, serializer_class)

    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        api = services.api_activate(api=self.get_object(), actor=self.actor)
        return self.render(self.get_queryset().get(pk=api.pk))

    @action(detail=True, methods=["post"])
    def deprecate(self, request: Request, pk: str) -> Response:
        data = self.validated(s.ApiDeprecateSerializer)
        api = services.api_deprecate(api=self.get_object(), actor=self.actor, sunset_at=data.get("sunset_at"))
        return self.render(self.get_queryset().get(pk=api.pk))

    @action(detail=True, methods=["post"])
    def retire(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        api = services.api_retire(api=self.get_object(), actor=self.actor)
        return self.render(self.get_queryset().get(pk=api.pk))


# ---------------------------------------------------------------------------
# Consumers and keys
# ---------------------------------------------------------------------------


@extend_schema_view(
    block=extend_schema(request=None, summary="Block: its keys are refused within a second (tenant admins)"),
    unblock=extend_schema(request=None, summary="Unblock (tenant admins)"),
    identity=extend_schema(
        responses={204: OpenApiResponse(description="Deleted.")},
        summary="Delete an identity: its tokens stop acting as the consumer within a second (tenant admins)",
    ),
)
class ConsumerViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin, mixins.DestroyModelMixin):
    """Consumers (apps); developers manage the ones they own."""

    queryset = Consumer.objects.select_related("owner")
    serializer_class = s.ConsumerSerializer
    filter_fields = {"tenant_id": ("tenant_id", None), "status": ("status", tuple(Consumer.Status.values))}
    ordering_fields = ["name", "created_at"]
    ordering = ["tenant_id", "name"]
    # Identities decide whose tokens act as the consumer: tenant admins manage them (developers read their own).
    action_permissions = {"block": DECIDE, "unblock": DECIDE, "identities": DECIDE, "identity": DECIDE}

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.ConsumerSerializer)
        tenant = self.tenant_for_create(Consumer, data.pop("tenant_id"))
        data.pop("status", None)
        # A developer's consumer is theirs; one created by an admin or staff belongs to nobody in particular.
        owner = self.actor if roles_of(self.actor).get(tenant.id) == TenantMembership.Role.DEVELOPER else None
        consumer = services.consumer_create(tenant=tenant, actor=self.actor, owner=owner, **data)
        return self.render(self.get_queryset().get(pk=consumer.pk), status.HTTP_201_CREATED)

    def perform_service_update(self, obj: Consumer, data: dict[str, Any]) -> Consumer:
        new_status = data.pop("status", obj.status)
        consumer = services.consumer_update(consumer=obj, actor=self.actor, **data)
        if new_status != consumer.status:
            if not may_act_on(self.actor, consumer, DECIDE):
                raise exceptions.PermissionDenied("Only tenant admins can block or unblock a consumer.")
            change = services.consumer_block if new_status == Consumer.Status.BLOCKED else services.consumer_unblock
            consumer = change(consumer=consumer, actor=self.actor)
        return consumer

    def perform_destroy(self, instance: Consumer) -> None:
        services.consumer_delete(consumer=instance, actor=self.actor)

    @action(detail=True, methods=["post"])
    def block(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        consumer = services.consumer_block(consumer=self.get_object(), actor=self.actor)
        return self.render(self.get_queryset().get(pk=consumer.pk))

    @action(detail=True, methods=["post"])
    def unblock(self, request: Request, pk: str) -> Response:
        self.validated(s.EmptySerializer)
        consumer = services.consumer_unblock(consumer=self.get_object(), actor=self.actor)
        return self.render(self.get_queryset().get(pk=consumer.pk))

    @extend_schema(
        methods=["GET"],
        request=None,
        responses=s.ConsumerIdentitySerializer(many=True),
        summary="The consumer's identities at JWT issuers",
    )
    @extend_schema(
        methods=["POST"],
        request=s.ConsumerIdentitySerializer,
        responses={201: s.ConsumerIdentitySerializer},
        summary="Add an identity at a JWT issuer of the tenant (tenant admins)",
    )
    @action(detail=True, methods=["get", "post"], pagination_class=None, filter_backends=[])
    def identities(self, request: Request, pk: str) -> Response:
        consumer = self.get_object()
        if request.method == "GET":
            rows = ConsumerIdentity.objects.filter(consumer=consumer).order_by("issuer_id", "external_id")
            return Response(s.ConsumerIdentitySerializer(rows, many=True).data)
        data = self.validated(s.ConsumerIdentitySerializer)
        issuer = JwtIssuer.objects.filter(pk=data["issuer_id"], tenant_id=consumer.tenant_id).first()
        if issuer is None:
            raise exceptions.ValidationError(
                {"issuer_id": [f"Unknown JWT issuer {data['issuer_id']!r} for this consumer's tenant."]}
            )
        identity = services.consumer_identity_create(
            consumer=consumer, issuer=issuer, external_id=data["external_id"], actor=self.actor
        )
        return Response(s.ConsumerIdentitySerializer(identity).data, status=status.HTTP_201_CREATED)

    @action(
        detail=True,
        methods=["delete"],
        url_path=rf"identities/(?P<identity_id>{ID_REGEX})",
        pagination_class=None,
        filter_backends=[],
    )
    def identity(self, request: Request, pk: str, identity_id: str) -> Response:
        consumer = self.get_object()
        identity = ConsumerIdentity.objects.filter(pk=identity_id, consumer=consumer).select_related("consumer").first()
        if identity is None:
            raise exceptions.NotFound(f"Consumer {consumer.pk} has no identity {identity_id}.")
        services.consumer_identity_delete(identity=identity, actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


KEY_CREATED_EXAMPLE = OpenApiExample(
    "Key created",
    response_only=True,
    status_codes=["201"],
    value={
        "key_id": "key_3kT9wQ8mZr1LxV0bN5aP",
        "consumer_id": "con_7HqL2sVx9KdPw4RmTz0c",
        "tenant_id": "acme",
        "name": "production",
        "key_prefix": "ak_live_4fGh",
        "active": True,
        "expires_at": None,
        "last_used_at": None,
        "revoked_at": None,
        "rotated_from": None,
        "created_at": "2026-01-01T12:00:00Z",
        "key": "ak_live_4fGhJ8kLmN2pQrS5tUvW9xYz1aBcDeF3g0hIjK2",
    },
)


@extend_schema_view(
    create=extend_schema(
        request=s.ApiKeySerializer,
        responses={201: s.ApiKeyCreatedSerializer},
        summary="Create a key; the plaintext `key` is in this response only",
        examples=[
            OpenApiExample(
                "Create a key",
                request_only=True,
                value={"consumer_id": "con_7HqL2sVx9KdPw4RmTz0c", "name": "production", "expires_at": None},
            ),
            KEY_CREATED_EXAMPLE,
        ],
    ),
    rotate=extend_schema(
        request=s.ApiKeyRotateSerializer,
        responses={201: s.ApiKeyRotatedSerializer},
        summary="Create a successor key; the old one works for overlap_seconds more",
    ),
    revoke=extend_schema(request=None, responses={200: s.ApiKeySerializer}, summary="Revoke for good"),
    partial_update=extend_schema(
        request=s.ApiKeyUpdateSerializer,
        responses={200: s.ApiKeySerializer},
        summary="Rename a key or change its IP lists (not once revoked)",
    ),
)
class ApiKeyViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin):
    """API keys of consumers; the plaintext appears only in the create and rotate answers."""

    queryset = ApiKey.objects.select_related("consumer")
    serializer_class = s.ApiKeySerializer
    lookup_field = "key_id"
    filter_fields = {"tenant_id": ("consumer__tenant_id", None), "consumer_id": ("consumer_id", None)}
    ordering_fields = ["created_at", "name", "expires_at", "last_used_at"]
    ordering = ["-created_at"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.ApiKeySerializer)
        consumer = self.consumer_for_write(data.pop("consumer_id"))
        key, plaintext = services.api_key_create(consumer=consumer, actor=self.actor, **data)
        body = s.ApiKeyCreatedSerializer(key).data
        body["key"] = plaintext
        return Response(body, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, key_id: str) -> Response:
        data = self.validated(s.ApiKeyRotateSerializer)
        old = self.get_object()
        successor, plaintext = services.api_key_rotate(key=old, actor=self.actor, **data)
        old.refresh_from_db(fields=["expires_at"])
        body = s.ApiKeyRotatedSerializer(successor).data
        body["key"] = plaintext
        body["previous_key_expires_at"] = (
            serializers.DateTimeField().to_representation(old.expires_at) if old.expires_at else None
        )
        return Response(body, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, key_id: str) -> Response:
        self.validated(s.EmptySerializer)
        key = services.api_key_revoke(key=self.get_object(), actor=self.actor)
        return self.render(key)

    def partial_update(self, request: Request, key_id: str) -> Response:
        key = self.get_object()
        data = self.validated(s.ApiKeyUpdateSerializer)
        key = services.api_key_update(key=key, actor=self.actor, **data)
        return self.render(self.get_queryset().get(pk=key.pk))


# ---------------------------------------------------------------------------
# JWT issuers
# ---------------------------------------------------------------------------


@extend_schema_view(
    destroy=destroy_schema(
        "Delete a JWT issuer no API accepts (its consumer identities go with it)",
        "APIs still accept the issuer's tokens (named).",
    ),
)
class JwtIssuerViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin, UpdateMixin, mixins.DestroyModelMixin):
    """Identity providers whose tokens the tenant's APIs may accept (`jwt_issuers` of an API)."""

    queryset = JwtIssuer.objects.all()
    serializer_class = s.JwtIssuerSerializer
    filter_fields = {"tenant_id": ("tenant_id", None)}
    ordering_fields = ["name", "created_at", "updated_at"]
    ordering = ["tenant_id", "name"]
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.JwtIssuerSerializer)
        tenant = self.tenant_for_create(JwtIssuer, data.pop("tenant_id"))
        issuer = services.jwt_issuer_create(tenant=tenant, actor=self.actor, **data)
        return self.render(issuer, status.HTTP_201_CREATED)

    def perform_service_update(self, obj: JwtIssuer, data: dict[str, Any]) -> JwtIssuer:
        return services.jwt_issuer_update(jwt_issuer=obj, actor=self.actor, **data)

    def perform_destroy(self, instance: JwtIssuer) -> None:
        services.jwt_issuer_delete(issuer=instance, actor=self.actor)


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


@extend_schema_view(
    approve=extend_schema(request=s.DecisionSerializer, summary="Approve a pending subscription (tenant admins)"),
    reject=extend_schema(request=s.DecisionSerializer, summary="Reject a pending subscription (tenant admins)"),
    cancel=extend_schema(request=s.DecisionSerializer, summary="Cancel a pending or active subscription"),
)
class SubscriptionViewSet(ScopedViewSet, ReadMixin, mixins.CreateModelMixin):
    """Subscriptions of consumers to APIs; tenant admins approve or reject pending ones."""

    queryset = Subscription.objects.select_related("consumer", "decided_by")
    serializer_class = s.SubscriptionSerializer
    filter_fields = {
        "tenant_id": ("consumer__tenant_id", None),
        "status": ("status", tuple(Subscription.Status.values)),
        "api_id": ("api_id", None),
        "consumer_id": ("consumer_id", None),
        "plan_id": ("plan_id", None),
    }
    ordering_fields = ["created_at", "decided_at", "status"]
    ordering = ["-created_at"]
    action_permissions = {"approve": DECIDE, "reject": DECIDE, "cancel": CHANGE}

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(s.SubscriptionSerializer)
        consumer = self.consumer_for_write(data["consumer_id"])
        apis = Api.objects.filter(pk=data["api_id"], tenant_id=consumer.tenant_id)
        if (
            not is_platform_staff(self.actor)
            and roles_of(self.actor).get(consumer.tenant_id) != TenantMembership.Role.ADMIN
        ):
            # Developers subscribe to what the portal lists; a private API is for admins to hand out.
            apis = apis.filter(visibility=Api.Visibility.PUBLIC)
        api = apis.first()
        if api is None:
            raise exceptions.ValidationError(
                {"api_id": [f"Unknown API {data['api_id']!r} for this consumer's tenant."]}
            )
        plan = None
        if data.get("plan_id"):
            plan = Plan.objects.filter(pk=data["plan_id"], tenant_id=consumer.tenant_id).first()
            if plan is None:
                raise exceptions.ValidationError(
                    {"plan_id": [f"Unknown plan {data['plan_id']!r} for this consumer's tenant."]}
                )
        subscription = services.subscription_request(consumer=consumer, api=api, plan=plan, actor=self.actor)
        return self.render(self.get_queryset().get(pk=subscription.pk), status.HTTP_201_CREATED)

    def _decide(self, decide: Any) -> Response:
        data = self.validated(s.DecisionSerializer)
        subscription = decide(subscription=self.get_object(), actor=self.actor, note=data.get("note", ""))
        return self.render(self.get_queryset().get(pk=subscription.pk))

    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        return self._decide(services.subscription_approve)

    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str) -> Response:
        return self._decide(services.subscription_reject)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        return self._decide(services.subscription_cancel)


# ---------------------------------------------------------------------------
# Audit events and usage
# ---------------------------------------------------------------------------


class AuditEventViewSet(ScopedViewSet, ReadMixin):
    """Who changed what, when and from where (read-only)."""

    queryset = AuditEvent.objects.all()
    serializer_class = s.AuditEventSerializer
    lookup_value_regex = r"[0-9]{1,18}"
    filter_fields = {
        "tenant_id": ("tenant_id", None),
        "action": ("action", None),
        "object_type": ("object_type", None),
        "object_id": ("object_id", None),
    }
    ordering_fields = ["at", "action", "object_type"]
    ordering = ["-at", "-id"]


# Each interval reads its own table: minute rows, UTC hours, days in the tenant's time zone (kept by the flusher).
USAGE_TABLES: dict[str, type[UsageRecord | UsageHourly | UsageDaily]] = {
    "minute": UsageRecord,
    "hour": UsageHourly,
    "day": UsageDaily,
}
USAGE_TOTAL_TABLES: dict[str, type[UsageHourlyTotal | UsageDailyTotal]] = {
    "hour": UsageHourlyTotal,
    "day": UsageDailyTotal,
}
# Widest window per interval, so one call cannot ask the database for millions of buckets.
USAGE_MAX_SPAN = {"minute": timedelta(days=7), "hour": timedelta(days=93), "day": timedelta(days=3660)}
USAGE_DEFAULT_SPAN = {"minute": timedelta(hours=1), "hour": timedelta(hours=24), "day": timedelta(days=30)}
USAGE_MAX_ROWS = 10_000

USAGE_EXAMPLE = OpenApiExample(
    "Hourly usage of one API",
    response_only=True,
    value={
        "interval": "hour",
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-02T00:00:00Z",
        "results": [
            {
                "bucket": "2026-01-01T10:00:00Z",
                "requests": 1200,
                "errors": 12,
                "rate_limited": 30,
                "bytes_in": 48000,
                "bytes_out": 960000,
                "latency_ms_avg": 23.5,
                "latency_ms_max": 410.0,
                "connections": 0,
                "connection_seconds": 0.0,
                "messages_in": 0,
                "messages_out": 0,
            }
        ],
    },
)


class UsageView(RequestContextMixin, APIView):
    """Traffic aggregated from am_usage_records by interval (and optionally one more dimension)."""

    @extend_schema(
        parameters=[s.UsageQuerySerializer],
        responses={200: s.UsageSerializer},
        examples=[USAGE_EXAMPLE],
        summary="Usage by minute, hour or day; buckets without traffic are omitted",
        description="Example: `GET /mgmt/v1/usage/?tenant_id=acme&api_id=api_…&interval=hour&from=2026-01-01T00:00:00Z`.",
    )
    def get(self, request: Request) -> Response:
        query = s.UsageQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        params = query.validated_data
        interval: str = params["interval"]
        end: datetime = params.get("to") or timezone.now()
        start: datetime = params.get("from") or end - USAGE_DEFAULT_SPAN[interval]
        if start >= end:
            raise exceptions.ValidationError({"from": ["from must be before to."]})
        if end - start > USAGE_MAX_SPAN[interval]:
            raise exceptions.ValidationError(
                {"from": [f"With interval={interval} ask for at most {USAGE_MAX_SPAN[interval].days} days."]}
            )
        records, dimensions = _usage_source(request.user, interval, params)
        records = records.filter(timestamp__gte=start, timestamp__lt=end)
        rows = list(
            # Rows already start at their bucket (a day: the tenant's local midnight, so no UTC truncation).
            records.annotate(bucket=F("timestamp"))
            .values(
                "bucket",
                *[name for name, expr in dimensions.items() if expr is None],
                **{name: expr for name, expr in dimensions.items() if expr is not None},
            )
            .annotate(
                requests=Sum("request_count"),
                errors=Sum("error_count"),
                rate_limited=Coalesce(Sum("request_count", filter=Q(status_code=429)), 0),
                bytes_in=Sum("bytes_in"),
                bytes_out=Sum("bytes_out"),
                latency_sum=Sum("latency_ms_sum"),
                latency_ms_max=Max("latency_ms_max"),
                connections=Sum("connection_count"),
                connection_seconds=Sum("connection_seconds"),
                messages_in=Sum("messages_in"),
                messages_out=Sum("messages_out"),
            )
            # A long WebSocket connection's later minutes have no request (its handshake was earlier), only time.
            .filter(Q(requests__gt=0) | Q(connection_seconds__gt=0))
            .order_by("bucket", *dimensions)[: USAGE_MAX_ROWS + 1]
        )
        if len(rows) > USAGE_MAX_ROWS:
            raise exceptions.ValidationError(
                {"from": [f"More than {USAGE_MAX_ROWS} buckets; narrow from/to or use a coarser interval."]}
            )
        for row in rows:
            latency_sum = row.pop("latency_sum")
            row["latency_ms_avg"] = round(latency_sum / row["requests"], 3) if row["requests"] else 0.0
        body = s.UsageSerializer({"interval": interval, "from": start, "to": end, "results": rows}).data
        return Response(body)


def _usage_source(user: Any, interval: str, params: dict[str, Any]) -> tuple[QuerySet[Any], dict[str, F | None]]:
    """The rows a usage query reads, filtered, and its second dimension (``{name: expression, or None: a column}``).

    By hour or day, a query about a whole tenant, one API or one consumer (no key, not both) from a user who sees the
    whole tenant reads the totals tables: a few rows per bucket instead of one per key. Anything else reads the
    per-key rows, restricted to what the user may see.
    """
    group_by = params.get("group_by")
    tenant_id = params.get("tenant_id")
    narrowed = [name for name in ("api_id", "consumer_id") if params.get(name) or group_by == name]
    sees_tenant = is_platform_staff(user) or (
        tenant_id is not None
        and roles_of(user).get(tenant_id) in (TenantMembership.Role.ADMIN, TenantMembership.Role.VIEWER)
    )
    if interval != "minute" and tenant_id and sees_tenant and not params.get("key_id") and len(narrowed) <= 1:
        table = USAGE_TOTAL_TABLES[interval]
        if narrowed:
            dimension = narrowed[0].removesuffix("_id")
            records = table.objects.filter(tenant_id=tenant_id, dimension=dimension)
            if params.get(narrowed[0]):
                records = records.filter(value=params[narrowed[0]])
        else:
            records = table.objects.filter(tenant_id=tenant_id, dimension="tenant")
        # The totals tables name the API or consumer "value"; status codes are a column of their own.
        return records, ({group_by: F("value") if group_by != "status_code" else None} if group_by else {})
    rows: QuerySet[Any] = restrict(USAGE_TABLES[interval].objects.all(), user, VIEW)
    for name in ("tenant_id", "api_id", "consumer_id", "key_id"):
        if params.get(name):
            rows = rows.filter(**{name: params[name]})
    return rows, ({group_by: None} if group_by else {})


@csrf_exempt
def route_not_found(request: HttpRequest) -> HttpResponse:
    """A /mgmt/ URL that matches no route: a problem+json 404, with a hint when only the trailing slash is missing."""
    detail = f"No management API route matches {request.path!r}."
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.url_name != "mgmt-not-found":
            detail += f" Did you mean {request.path + '/'!r}?"
    body: dict[str, Any] = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": detail}
    if request_id_var.get():
        body["request_id"] = request_id_var.get()
    return JsonResponse(body, status=404, content_type=PROBLEM_CONTENT_TYPE)
