"""Django app config for the gateway: registers the route-table readiness check."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings


def _route_table_ready() -> bool:
    from gateway.wsgi import get_gateway

    return get_gateway().ready()


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        if settings.APIMGMT_ROLE in ("all", "gateway"):
            from apimgmt.probes import READINESS_CHECKS

            READINESS_CHECKS["route_table"] = _route_table_ready
