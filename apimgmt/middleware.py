"""Control-plane request context: a request id and client IP for every log line, and one JSON access-log line."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from functools import cache

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from apimgmt.context import accept_request_id, client_ip_var, request_id_var

access_logger = logging.getLogger("apimgmt.access")

# Probes and scrapes run every few seconds; a success there is not worth a line at info level.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def _trusted_proxies(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip())


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(request: HttpRequest) -> str:
    """The client address: REMOTE_ADDR, or the nearest X-Forwarded-For hop that is not a trusted proxy."""
    remote = str(request.META.get("REMOTE_ADDR", ""))
    networks = _trusted_proxies(tuple(settings.GATEWAY.get("TRUSTED_PROXIES", ())))
    if not networks or not _is_trusted(remote, networks):
        return remote
    hops = [hop.strip() for hop in str(request.META.get("HTTP_X_FORWARDED_FOR", "")).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            return hop
    return hops[0] if hops else remote


def _route_template(request: HttpRequest) -> str:
    # The URL pattern, never the raw path: paths carry ids and, in password-reset links, tokens.
    match = request.resolver_match
    if match is None:
        return "<unmatched>"
    return "/" + match.route if match.route else f"<{match.view_name}>"


class RequestContextMiddleware:
    """Right after the gateway in MIDDLEWARE: everything below it runs with the request id set."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        request_id = accept_request_id(request.META.get("HTTP_X_REQUEST_ID"))
        ip = client_ip(request)
        request.request_id = request_id  # type: ignore[attr-defined]
        rid_token = request_id_var.set(request_id)
        ip_token = client_ip_var.set(ip)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            response["X-Request-ID"] = request_id
            self._log(request, response, ip, (time.perf_counter() - started) * 1000)
            return response
        finally:
            request_id_var.reset(rid_token)
            client_ip_var.reset(ip_token)

    @staticmethod
    def _log(request: HttpRequest, response: HttpResponseBase, ip: str, duration_ms: float) -> None:
        status = response.status_code
        if status >= 500:
            level = logging.WARNING
        elif request.path in QUIET_PATHS and status < 400:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        user = getattr(request, "user", None)
        kwargs = request.resolver_match.kwargs if request.resolver_match else {}
        access_logger.log(
            level,
            "request",
            extra={
                "method": request.method,
                "path": _route_template(request),
                "status": status,
                "duration_ms": round(duration_ms, 2),
                "client_ip": ip,
                "user_id": user.pk if user is not None and user.is_authenticated else None,
                "tenant": kwargs.get("tenant") or kwargs.get("tenant_id"),
            },
        )
