"""Who may see what in a tenant's portal: the tenant from the URL, the member's role, and owned apps."""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, Concatenate, ParamSpec

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from apimgmt import selectors
from apimgmt.models import Consumer, Tenant, TenantMembership

P = ParamSpec("P")

# Roles that may create apps, subscribe and manage keys; viewers only read.
WRITER_ROLES = (TenantMembership.Role.ADMIN, TenantMembership.Role.DEVELOPER)


@dataclass(frozen=True)
class Portal:
    """The tenant a portal request is for and, when signed in as one of its members, the member's role."""

    tenant: Tenant
    role: str | None

    @property
    def is_member(self) -> bool:
        return self.role is not None

    @property
    def can_write(self) -> bool:
        return self.role in WRITER_ROLES

    @property
    def is_admin(self) -> bool:
        return self.role == TenantMembership.Role.ADMIN


def portal_tenant(slug: str) -> Tenant:
    """The active tenant with this id; unknown and suspended tenants are both 404 so neither is revealed."""
    return get_object_or_404(Tenant, pk=slug, status=Tenant.Status.ACTIVE)


def resolve_portal(request: HttpRequest, slug: str) -> Portal:
    tenant = portal_tenant(slug)
    role = selectors.user_role(request.user, tenant.id) if request.user.is_authenticated else None
    return Portal(tenant=tenant, role=role)


def login_url(tenant: Tenant, next_path: str | None = None) -> str:
    url = reverse("portal:login", args=[tenant.id])
    return f"{url}?{urlencode({'next': next_path})}" if next_path else url


PortalView = Callable[Concatenate[HttpRequest, Portal, P], HttpResponse]


def portal_page(
    *, member: bool = False, writer: bool = False
) -> Callable[[PortalView[P]], Callable[Concatenate[HttpRequest, str, P], HttpResponse]]:
    """Resolve the tenant (404 when unknown or suspended) and, when asked, require a signed-in member or writer.

    Every portal view goes through this, so tenant scoping lives in one place.
    """

    def decorate(view: PortalView[P]) -> Callable[Concatenate[HttpRequest, str, P], HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, tenant: str, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
            portal = resolve_portal(request, tenant)
            if (member or writer) and not portal.is_member:
                if request.user.is_authenticated:
                    messages.info(
                        request,
                        f"You are signed in as {request.user.get_username()}, who is not a member of "
                        f"{portal.tenant.name}. Sign in with an account of this portal.",
                    )
                return HttpResponseRedirect(login_url(portal.tenant, request.get_full_path()))
            if writer and not portal.can_write:
                reason = (
                    "Your role in this portal is read-only; ask an administrator of this portal for developer access."
                )
                return page(request, portal, "portal/forbidden.html", {"reason": reason}, status=403)
            try:
                return view(request, portal, *args, **kwargs)
            except Http404:
                # In a known portal, "not found" is the portal's own page, with its name and a way back.
                return page(request, portal, "portal/404.html", status=404)

        return wrapper

    return decorate


def owned_app(request: HttpRequest, portal: Portal, app_id: str) -> Consumer:
    """The signed-in developer's own app in this tenant; anyone else's (or another tenant's) is a 404."""
    try:
        return Consumer.objects.get(pk=app_id, tenant=portal.tenant, owner_id=request.user.pk)
    except Consumer.DoesNotExist:
        raise Http404("No such app.") from None


def page(
    request: HttpRequest, portal: Portal, template: str, context: dict[str, Any] | None = None, *, status: int = 200
) -> HttpResponse:
    """Render a portal template with the portal (tenant, role) in its context, times in the tenant's zone."""
    try:
        zone = zoneinfo.ZoneInfo(portal.tenant.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    with timezone.override(zone):
        return render(request, template, {"portal": portal, "tenant": portal.tenant, **(context or {})}, status=status)
