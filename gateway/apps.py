"""Django app config for the gateway: registers the route-table readiness check."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings

from apimgmt.process_role import serves_gateway


def _route_table_ready() -> bool:
    from gateway.wsgi import get_gateway

    return get_gateway().ready()


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        if serves_gateway(settings.APIMGMT_ROLE):
            from apimgmt.probes import READINESS_CHECKS

            READINESS_CHECKS["route_table"] = _route_table_ready
