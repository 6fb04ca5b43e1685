"""Control-plane middleware: request context (request id, client IP, one JSON access-log line) and browser headers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from apimgmt.client_address import client_address_of
from apimgmt.context import accept_request_id, client_ip_var, request_id_var

access_logger = logging.getLogger("apimgmt.access")

# Probes and scrapes run every few seconds; a success there is not worth a line at info level.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


def client_ip(request: HttpRequest) -> str:
    """The client address (apimgmt.client_address: REMOTE_ADDR, or X-Forwarded-For through TRUSTED_PROXIES)."""
    return client_address_of(request.META)


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


# Content-Security-Policy of every control-plane page: only this origin's own files, no inline script or style,
# no plugins, never framed. CSP_EXTRA and CSP_REPORT_URI (settings.py, docs/operations.md) add to it.
CONTENT_SECURITY_POLICY: dict[str, tuple[str, ...]] = {
    "default-src": ("'self'",),
    "script-src": ("'self'",),
    "style-src": ("'self'",),
    "img-src": ("'self'", "data:"),
    "font-src": ("'self'", "data:"),
    "connect-src": ("'self'",),
    "object-src": ("'none'",),
    "base-uri": ("'self'",),
    "form-action": ("'self'",),
    "frame-ancestors": ("'none'",),
}

# Sources added for the pages that cannot do without them, by template: the template is what carries the inline
# code, so the exception goes exactly where it does. Every other page keeps the strict policy.
PAGE_EXCEPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    # drf-spectacular's Swagger UI (/mgmt/docs/) has an inline <style> block (its start-up script is a separate file:
    # apimgmt/api/urls.py uses the split view).
    "drf_spectacular/swagger_ui.html": {"style-src": ("'unsafe-inline'",)},
    # ReDoc (/mgmt/redoc/) styles itself with <style> elements (styled-components) and builds its search index in
    # a Worker made from a blob: URL. Its Google Fonts stylesheet and Redocly logo stay blocked: no third party
    # learns who reads the docs, and ReDoc falls back to system fonts and no logo.
    "drf_spectacular/redoc.html": {"style-src": ("'unsafe-inline'",), "worker-src": ("'self'", "blob:")},
}

# Browser features no control-plane page uses (the copy buttons need clipboard-write, which stays allowed).
PERMISSIONS_POLICY = "camera=(), geolocation=(), microphone=(), payment=(), usb=()"


def _merge(policy: dict[str, tuple[str, ...]], extra: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    merged = dict(policy)
    for directive, sources in extra.items():
        # A source added to a 'none' directive replaces 'none' (browsers ignore 'none' next to a source).
        kept = tuple(source for source in merged.get(directive, ()) if source != "'none'")
        merged[directive] = kept + tuple(source for source in sources if source not in kept)
    return merged


def content_security_policy(template: str | None = None) -> str:
    """The policy for a page rendered from ``template``: the strict default, CSP_EXTRA, the page's exception."""
    policy = _merge(CONTENT_SECURITY_POLICY, settings.CSP_EXTRA)
    if template in PAGE_EXCEPTIONS:
        policy = _merge(policy, PAGE_EXCEPTIONS[template])
    parts = [" ".join((directive, *sources)) for directive, sources in policy.items()]
    if settings.CSP_REPORT_URI:
        parts.append(f"report-uri {settings.CSP_REPORT_URI}")
    return "; ".join(parts)


def _templates(response: HttpResponseBase) -> tuple[str, ...]:
    # TemplateResponse and DRF's Response keep the template name (or the list of candidates) they render.
    names = getattr(response, "template_name", None)
    if isinstance(names, str):
        return (names,)
    if isinstance(names, list | tuple):
        return tuple(name for name in names if isinstance(name, str))
    return ()


def _is_html(response: HttpResponseBase) -> bool:
    return str(response.get("Content-Type", "")).startswith("text/html")


class SecurityHeadersMiddleware:
    """Content-Security-Policy and Permissions-Policy on every control-plane response.

    Django's SecurityMiddleware sets HSTS, nosniff, Referrer-Policy and Cross-Origin-Opener-Policy. The gateway
    answers API traffic before this middleware runs, so upstreams' responses never get these headers.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.header = "Content-Security-Policy-Report-Only" if settings.CSP_REPORT_ONLY else "Content-Security-Policy"
        self.policy = content_security_policy()
        self.exceptions = {template: content_security_policy(template) for template in PAGE_EXCEPTIONS}

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if settings.DEBUG and response.status_code in (404, 500) and _is_html(response):
            # Django's technical 404 and 500 pages are inline style and script; production error pages are not.
            return response
        # A view that sets a policy of its own keeps it.
        if "Content-Security-Policy" not in response and "Content-Security-Policy-Report-Only" not in response:
            policy = next((self.exceptions[t] for t in _templates(response) if t in self.exceptions), self.policy)
            response[self.header] = policy
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response
