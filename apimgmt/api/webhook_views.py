"""Management API for events out: webhook endpoints and their delivery log, plan changes and archived plans."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apimgmt import events, services, webhooks
from apimgmt.api import serializers as s
from apimgmt.api.permissions import CHANGE, DECIDE, may_act_on
from apimgmt.api.views import ReadMixin, ScopedViewSet, destroy_schema
from apimgmt.models import Plan, Subscription, WebhookDelivery, WebhookEndpoint

# ---------------------------------------------------------------------------
# Serializers
# ---------------------------------------------------------------------------


class WebhookEndpointSerializer(s.StrictModelSerializer):
    tenant_id = s.StrictCharField(max_length=63)
    url = s.StrictCharField(max_length=2000, help_text="Where events are POSTed (the upstreams' address checks).")
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=events.EVENT_TYPES),
        required=False,
        max_length=len(events.EVENT_TYPES),
        help_text="Event types sent here; empty or absent: every type.",
    )
    create_only_fields = ("tenant_id",)

    class Meta:
        model = WebhookEndpoint
        fields = [
            "id",
            "tenant_id",
            "url",
            "description",
            "event_types",
            "status",
            "disabled_reason",
            "previous_secret_expires_at",
            "failing_since",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "status",
            "disabled_reason",
            "previous_secret_expires_at",
            "failing_since",
            "created_at",
            "updated_at",
        ]
        validators: list[Any] = []


class WebhookEndpointWithSecretSerializer(WebhookEndpointSerializer):
    secret = serializers.SerializerMethodField(help_text="The signing secret (whsec_…): shown only in this answer.")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]

    def get_secret(self, obj: WebhookEndpoint) -> str:
        return obj.secret


class RotateSecretSerializer(s.StrictSerializer):
    overlap_seconds = s.StrictIntegerField(
        required=False,
        default=webhooks.DEFAULT_ROTATION_OVERLAP_SECONDS,
        min_value=0,
        max_value=webhooks.MAX_ROTATION_OVERLAP_SECONDS,
        help_text="How long the previous secret also signs (a second signature); 0 stops it now.",
    )


class WebhookDeliverySerializer(serializers.ModelSerializer):
    endpoint_id = serializers.CharField(read_only=True)
    event_id = serializers.CharField(read_only=True)
    event_type = serializers.CharField(source="event.event_type", read_only=True)
    replay_of = serializers.IntegerField(source="replay_of_id", read_only=True, allow_null=True)

    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "endpoint_id",
            "event_id",
            "event_type",
            "status",
            "attempts",
            "response_code",
            "latency_ms",
            "last_error",
            "next_attempt_at",
            "last_attempt_at",
            "completed_at",
            "created_at",
            "replay_of",
        ]
        read_only_fields = fields


class ChangePlanSerializer(s.StrictSerializer):
    plan_id = s.StrictCharField(max_length=64)
    effective = serializers.ChoiceField(
        choices=services.PLAN_CHANGE_EFFECTIVE,
        default="now",
        help_text="now: at once, quota used this window carries over; next_period: at the start of the next "
        "calendar quota window in the tenant's time zone.",
    )


# ---------------------------------------------------------------------------
# Webhook endpoints and deliveries
# ---------------------------------------------------------------------------


@extend_schema_view(
    create=extend_schema(
        summary="Create a webhook endpoint; the answer holds its signing secret, shown only this once",
        responses={201: WebhookEndpointWithSecretSerializer},
    ),
    rotate_secret=extend_schema(
        request=RotateSecretSerializer,
        responses={200: WebhookEndpointWithSecretSerializer},
        summary="A new signing secret (shown once); the previous one also signs during the overlap",
    ),
    enable=extend_schema(request=s.EmptySerializer, summary="Enable a disabled endpoint (deliveries resume)"),
    disable=extend_schema(request=s.EmptySerializer, summary="Disable an endpoint (no deliveries until enabled)"),
    deliveries=extend_schema(summary="The endpoint's delivery log, newest first"),
    destroy=destroy_schema("Delete a webhook endpoint and its delivery log", "never"),
)
class WebhookEndpointViewSet(
    ScopedViewSet, ReadMixin, mixins.CreateModelMixin, mixins.UpdateModelMixin, mixins.DestroyModelMixin
):
    """Where a tenant's events are sent (Standard Webhooks signatures); tenant admins manage them."""

    queryset = WebhookEndpoint.objects.all()
    serializer_class = WebhookEndpointSerializer
    filter_fields = {
        "tenant_id": ("tenant_id", None),
        "status": ("status", tuple(WebhookEndpoint.Status.values)),
    }
    ordering_fields = ["created_at", "url"]
    ordering = ["tenant_id", "url"]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.validated(WebhookEndpointSerializer)
        tenant = self.tenant_for_create(WebhookEndpoint, data["tenant_id"])
        endpoint, _secret = webhooks.webhook_endpoint_create(
            tenant=tenant,
            url=data["url"],
            event_types=data.get("event_types", []),
            description=data.get("description", ""),
            actor=self.actor,
        )
        return self.render(endpoint, status.HTTP_201_CREATED, WebhookEndpointWithSecretSerializer)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        partial = kwargs.pop("partial", False)
        endpoint = self.get_object()
        data = self.validated(WebhookEndpointSerializer, instance=endpoint, partial=partial)
        data.pop("tenant_id", None)
        endpoint = webhooks.webhook_endpoint_update(endpoint=endpoint, actor=self.actor, **data)
        return self.render(endpoint)

    def perform_destroy(self, instance: WebhookEndpoint) -> None:
        webhooks.webhook_endpoint_delete(endpoint=instance, actor=self.actor)

    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        data = self.validated(RotateSecretSerializer)
        endpoint, _secret = webhooks.webhook_endpoint_rotate_secret(
            endpoint=endpoint, actor=self.actor, overlap_seconds=data["overlap_seconds"]
        )
        return self.render(endpoint, serializer_class=WebhookEndpointWithSecretSerializer)

    @action(detail=True, methods=["post"])
    def enable(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        self.validated(s.EmptySerializer)
        return self.render(webhooks.webhook_endpoint_enable(endpoint=endpoint, actor=self.actor))

    @action(detail=True, methods=["post"])
    def disable(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        self.validated(s.EmptySerializer)
        return self.render(webhooks.webhook_endpoint_disable(endpoint=endpoint, actor=self.actor))

    @action(detail=True, methods=["get"], serializer_class=WebhookDeliverySerializer)
    def deliveries(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        rows = WebhookDelivery.objects.filter(endpoint=endpoint).select_related("event").order_by("-created_at", "-id")
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(WebhookDeliverySerializer(page, many=True).data)


@extend_schema_view(
    replay=extend_schema(
        request=s.EmptySerializer,
        responses={201: WebhookDeliverySerializer},
        summary="Send the delivery's event to its endpoint again (a new delivery, the same webhook-id)",
    ),
)
class WebhookDeliveryViewSet(ScopedViewSet, ReadMixin):
    """The delivery log: each event sent to each endpoint, with status, answer, latency and attempts."""

    queryset = WebhookDelivery.objects.select_related("event")
    serializer_class = WebhookDeliverySerializer
    lookup_value_regex = r"[0-9]{1,18}"
    filter_fields = {
        "tenant_id": ("endpoint__tenant_id", None),
        "endpoint_id": ("endpoint_id", None),
        "event_id": ("event_id", None),
        "status": ("status", tuple(WebhookDelivery.Status.values)),
    }
    ordering_fields = ["created_at", "last_attempt_at", "status"]
    ordering = ["-created_at", "-id"]

    @action(detail=True, methods=["post"])
    def replay(self, request: Request, pk: str) -> Response:
        delivery = self.get_object()
        self.validated(s.EmptySerializer)
        replay = webhooks.webhook_delivery_replay(delivery=delivery, actor=self.actor)
        return self.render(WebhookDelivery.objects.select_related("event").get(pk=replay.pk), status.HTTP_201_CREATED)


# ---------------------------------------------------------------------------
# Plan changes and archived plans
# ---------------------------------------------------------------------------


@extend_schema_view(
    change_plan=extend_schema(
        request=ChangePlanSerializer,
        responses={200: s.SubscriptionSerializer, 202: s.SubscriptionSerializer},
        summary="Move a subscription to another plan without re-keying; a developer's move to a plan that needs "
        "approval waits for a tenant admin (202)",
    ),
)
class SubscriptionPlanViewSet(ScopedViewSet):
    """``POST /mgmt/v1/subscriptions/{id}/change-plan/``: mounted next to the subscriptions resource."""

    queryset = Subscription.objects.select_related("consumer", "decided_by")
    serializer_class = s.SubscriptionSerializer
    # Developers may ask for their own subscriptions (CHANGE); what happens then depends on the plan (below).
    action_permissions = {"change_plan": CHANGE}

    @action(detail=True, methods=["post"], url_path="change-plan")
    def change_plan(self, request: Request, pk: str) -> Response:
        subscription = self.get_object()  # first: another tenant's subscription is a 404 whatever the body
        data = self.validated(ChangePlanSerializer)
        plan = Plan.objects.filter(pk=data["plan_id"], tenant_id=subscription.consumer.tenant_id).first()
        if plan is None:
            raise exceptions.ValidationError(
                {"plan_id": [f"Unknown plan {data['plan_id']!r} for this subscription's tenant."]}
            )
        if may_act_on(self.actor, subscription, DECIDE):
            changed = services.subscription_change_plan(
                subscription=subscription, plan=plan, effective=data["effective"], actor=self.actor
            )
            return self.render(self.get_queryset().get(pk=changed.pk))
        # A developer: moved now when the plan (and API) take subscriptions automatically, else a request waiting
        # for a tenant admin (202, pending_plan_id set).
        if data["effective"] != "now":
            raise exceptions.ValidationError(
                {"effective": ["Developers change plan now (or ask for it); tenant admins schedule changes."]}
            )
        changed = services.subscription_request_plan_change(subscription=subscription, plan=plan, actor=self.actor)
        waiting = changed.pending_plan_id is not None
        code = status.HTTP_202_ACCEPTED if waiting else status.HTTP_200_OK
        return self.render(self.get_queryset().get(pk=changed.pk), code)


@extend_schema_view(
    archive=extend_schema(
        request=s.EmptySerializer, summary="Archive a plan: no new subscriptions, existing ones untouched"
    ),
    unarchive=extend_schema(request=s.EmptySerializer, summary="Take a plan out of the archive"),
)
class PlanArchiveViewSet(ScopedViewSet):
    """``POST /mgmt/v1/plans/{id}/archive/`` and ``unarchive/``: mounted next to the plans resource."""

    queryset = Plan.objects.prefetch_related("policies")
    serializer_class = s.PlanSerializer

    @action(detail=True, methods=["post"])
    def archive(self, request: Request, pk: str) -> Response:
        plan = self.get_object()
        self.validated(s.EmptySerializer)
        plan = services.plan_archive(plan=plan, actor=self.actor)
        return self.render(self.get_queryset().get(pk=plan.pk))

    @action(detail=True, methods=["post"])
    def unarchive(self, request: Request, pk: str) -> Response:
        plan = self.get_object()
        self.validated(s.EmptySerializer)
        plan = services.plan_unarchive(plan=plan, actor=self.actor)
        return self.render(self.get_queryset().get(pk=plan.pk))
