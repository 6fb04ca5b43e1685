"""URL configuration; which surfaces exist depends on APIMGMT_ROLE (all, gateway, control)."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path
from django_prometheus.exports import ExportToDjangoView

from apimgmt import probes

urlpatterns: list[URLPattern | URLResolver] = [
    path("health", probes.health, name="health"),
    path("ready", probes.ready, name="ready"),
    path("metrics", ExportToDjangoView, name="prometheus-django-metrics"),
]

if settings.APIMGMT_ROLE in ("all", "control"):
    urlpatterns += [
        path("admin/", admin.site.urls),
        path("mgmt/", include("apimgmt.api.urls")),
        path("portal/", include("portal.urls")),
    ]
