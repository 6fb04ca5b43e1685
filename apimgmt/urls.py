"""URL configuration; which surfaces exist depends on APIMGMT_ROLE (all, gateway, control)."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path

from apimgmt import probes
from apimgmt.process_role import serves_control_plane

# No /metrics here: clients reach this port. gunicorn.conf.py serves the metrics on METRICS_PORT.
urlpatterns: list[URLPattern | URLResolver] = [
    path("health", probes.health, name="health"),
    path("ready", probes.ready, name="ready"),
]

if serves_control_plane(settings.APIMGMT_ROLE):
    urlpatterns += [
        path("admin/", admin.site.urls),
        path("mgmt/", include("apimgmt.api.urls")),
        path("portal/", include("portal.urls")),
    ]

# Under /mgmt/ the last-resort errors are problem documents too (apimgmt/errors.py).
handler400 = "apimgmt.errors.bad_request"
handler500 = "apimgmt.errors.server_error"
