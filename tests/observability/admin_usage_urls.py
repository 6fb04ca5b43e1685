"""The project's URLs plus the usage overview at the path the admin wires it to (until the lead wires it there)."""

from __future__ import annotations

from django.urls import path

from apimgmt.admin_usage import usage_overview
from apimgmt.urls import urlpatterns as project_urlpatterns

urlpatterns = [
    path("admin/apimgmt/tenant/<str:tenant_id>/usage/", usage_overview, name="tenant-usage-overview"),
    *project_urlpatterns,
]
