"""Management API routes: resources under /mgmt/v1/, the OpenAPI schema and its docs (assets served locally)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView
from rest_framework.routers import SimpleRouter

from apimgmt.api import config_views, views, webhook_views

router = SimpleRouter()
router.register("tenants", views.TenantViewSet, basename="tenant")
router.register("apis", views.ApiViewSet, basename="api")
router.register("consumers", views.ConsumerViewSet, basename="consumer")
router.register("keys", views.ApiKeyViewSet, basename="key")
router.register("plans", views.PlanViewSet, basename="plan")
router.register("policies", views.PolicyViewSet, basename="policy")
router.register("jwt-issuers", views.JwtIssuerViewSet, basename="jwt-issuer")
router.register("subscriptions", views.SubscriptionViewSet, basename="subscription")
router.register("audit-events", views.AuditEventViewSet, basename="audit-event")
# Events out (apimgmt/api/webhook_views.py): webhooks, their delivery log, plan changes and archived plans.
router.register("webhooks", webhook_views.WebhookEndpointViewSet, basename="webhook")
router.register("webhook-deliveries", webhook_views.WebhookDeliveryViewSet, basename="webhook-delivery")
router.register("subscriptions", webhook_views.SubscriptionPlanViewSet, basename="subscription-plan")
router.register("plans", webhook_views.PlanArchiveViewSet, basename="plan-archive")

v1: list[URLPattern | URLResolver] = [
    # Before the router, whose apis/{id}/ would take "import" for an id.
    path("apis/import/", config_views.ApiImportView.as_view(), name="api-import"),
    *router.urls,
    path("usage/", views.UsageView.as_view(), name="usage"),
    # Configuration as code (apimgmt/api/config_views.py).
    path("config/schema/", config_views.ConfigSchemaView.as_view(), name="config-schema"),
    path("config/schema", config_views.ConfigSchemaAliasView.as_view()),
    path("tenants/<str:tenant_id>/config/", config_views.TenantConfigView.as_view(), name="tenant-config"),
    path(
        "tenants/<str:tenant_id>/config/plan/", config_views.TenantConfigPlanView.as_view(), name="tenant-config-plan"
    ),
    path(
        "tenants/<str:tenant_id>/config/apply/",
        config_views.TenantConfigApplyView.as_view(),
        name="tenant-config-apply",
    ),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("v1/", include((v1, "mgmt"), namespace="mgmt")),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[]), name="mgmt-schema"),
    # The split view serves Swagger UI's start-up script from docs/?script= rather than inline, so the page runs
    # under the control plane's script-src 'self' (apimgmt/middleware.py).
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="mgmt-schema", permission_classes=[]), name="mgmt-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="mgmt-schema", permission_classes=[]), name="mgmt-redoc"),
    # Last: any other /mgmt/ URL answers a problem+json 404 rather than Django's HTML page.
    re_path(r"^", views.route_not_found, name="mgmt-not-found"),
]
