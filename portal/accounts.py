"""Portal accounts: sign-up with e-mail verification or invitation, sign-in with lockout, sign-out, password reset."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.contrib.auth.views import PasswordResetConfirmView
from django.core.mail import send_mail
from django.db import transaction
from django.forms import BaseForm
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from apimgmt import services
from apimgmt.middleware import client_ip
from apimgmt.models import TenantMembership
from portal import lockout, mail_throttle, tokens
from portal.access import Portal, page, portal_page, resolve_portal
from portal.forms import InviteForm, LoginForm, SignUpForm, TenantPasswordResetForm

logger = logging.getLogger("portal")


def _client_ip(request: HttpRequest) -> str:
    # Behind a load balancer REMOTE_ADDR is the balancer: one counter for everyone would let 20 wrong
    # passwords lock the whole portal. client_ip honours X-Forwarded-For from GATEWAY TRUSTED_PROXIES only.
    return client_ip(request) or "unknown"


def site_link(path: str) -> str:
    """An absolute link for a mail: always SITE_URL, never the request's Host header (an attacker chooses that)."""
    return settings.SITE_URL.rstrip("/") + path


def _send(request: HttpRequest, portal: Portal, *, to: str, template: str, context: dict[str, Any]) -> None:
    body = render_to_string(template, {"tenant": portal.tenant, **context}, request=request)
    subject, _, text = body.partition("\n\n")
    send_mail(subject.strip(), text.strip() + "\n", None, [to])


def _mail_throttled(
    request: HttpRequest,
    portal: Portal,
    *,
    template: str,
    form: BaseForm,
    throttle: mail_throttle.MailThrottle,
    **context: Any,
) -> HttpResponse:
    """The form again, with a 429 that says when to try again; it is the same whether or not an account exists."""
    minutes = max(1, throttle.retry_after_seconds // 60)
    form.add_error(
        None, f"Too many e-mails were requested for this address or from your network. Wait {minutes} minutes."
    )
    response = page(request, portal, template, {"form": form, **context}, status=429)
    response["Retry-After"] = str(throttle.retry_after_seconds)
    return response


# ---------------------------------------------------------------------------
# Sign-up and verification
# ---------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@portal_page()
def signup(request: HttpRequest, portal: Portal) -> HttpResponse:
    invite_token = request.GET.get("invite") or request.POST.get("invite") or ""
    invitation = None
    if invite_token:
        try:
            invitation = tokens.check_invitation_token(invite_token, tenant_id=portal.tenant.id)
        except tokens.BadToken as exc:
            return page(request, portal, "portal/message.html", {"title": "Invitation", "text": str(exc)}, status=400)
    if invitation is None and not portal.tenant.open_signup:
        text = "This portal is by invitation only. Ask the API provider for an invitation."
        return page(request, portal, "portal/message.html", {"title": "Invitation only", "text": text}, status=403)
    invited_email = invitation.email if invitation else None
    form = SignUpForm(request.POST or None, invited_email=invited_email)
    if request.method == "POST" and form.is_valid():
        email = form.cleaned_data["email"]
        if invitation is None:
            # Everything the visitor sees from here on is the same whether or not the address has an account.
            throttle = mail_throttle.check_and_count(
                email=email, ip=_client_ip(request), purpose="signup", tenant_id=portal.tenant.id
            )
            if throttle.throttled:
                return _mail_throttled(
                    request, portal, template="portal/signup.html", form=form, throttle=throttle, invite=""
                )
            if _mail_existing_account(request, portal, email=email):
                make_password(form.cleaned_data["password1"])  # the hashing a new account costs: timing tells nothing
                return page(request, portal, "portal/signup_done.html", {"email": email})
        with transaction.atomic():
            user = form.save(commit=False)
            user.email = email
            # An invitation arrived at this address, which proves it; open sign-ups prove it by the link.
            user.is_active = invitation is not None
            user.save()
            if invitation is not None:
                services.membership_set(
                    tenant=portal.tenant, user=user, role=TenantMembership.Role.DEVELOPER, actor=user
                )
        if invitation is not None:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to {portal.tenant.name}! Create your first app to get a key.")
            return HttpResponseRedirect(reverse("portal:apps", args=[portal.tenant.id]))
        _send_verification(request, portal, user=user)
        return page(request, portal, "portal/signup_done.html", {"email": email})
    # An invalid form answers 400, as the sign-in form does.
    status = 400 if form.errors else 200
    return page(request, portal, "portal/signup.html", {"form": form, "invite": invite_token}, status=status)


def _send_verification(request: HttpRequest, portal: Portal, *, user: User) -> None:
    token = tokens.verification_token(user=user, tenant_id=portal.tenant.id)
    link = site_link(reverse("portal:verify", args=[portal.tenant.id, token]))
    _send(request, portal, to=user.email, template="portal/email/verify.txt", context={"user": user, "link": link})


def _mail_existing_account(request: HttpRequest, portal: Portal, *, email: str) -> bool:
    """Has the address an account? Then mail it (never the visitor) about this sign-up; nothing else changes."""
    accounts = User.objects.filter(email__iexact=email).order_by("pk")
    member = accounts.filter(is_active=True, memberships__tenant=portal.tenant).first()
    if member is not None:
        context = {
            "user": member,
            "member": True,
            "login_link": site_link(reverse("portal:login", args=[portal.tenant.id])),
            "reset_link": site_link(reverse("portal:password_reset", args=[portal.tenant.id])),
        }
        _send(request, portal, to=member.email, template="portal/email/signup_existing.txt", context=context)
        return True
    # Signed up, never confirmed: "sign up again", as the done page advises, sends the link again. The account's
    # user name and password stay as first chosen; a visitor cannot change them by signing up over it.
    pending = accounts.filter(tokens.PENDING_ACCOUNT, is_staff=False, memberships__isnull=True).first()
    if pending is not None:
        _send_verification(request, portal, user=pending)
        return True
    other = accounts.first()  # active elsewhere, or switched off here by an admin
    if other is None:
        return False
    context = {"user": other, "member": False}
    _send(request, portal, to=other.email, template="portal/email/signup_existing.txt", context=context)
    return True


@require_http_methods(["GET", "POST"])
@portal_page()
def verify(request: HttpRequest, portal: Portal, token: str) -> HttpResponse:
    """GET shows a button, POST confirms: a mail scanner that prefetches links cannot confirm for anybody."""
    try:
        user = tokens.check_verification_token(token, tenant_id=portal.tenant.id)
    except tokens.BadToken as exc:
        return page(
            request, portal, "portal/message.html", {"title": "E-mail verification", "text": str(exc)}, status=400
        )
    if request.method == "POST":
        try:
            with transaction.atomic():
                # Checked again on the locked row: of two confirmations racing, the second finds the link used.
                user = tokens.check_verification_token(token, tenant_id=portal.tenant.id, lock=True)
                user.is_active = True
                user.last_login = timezone.now()  # the confirmation mark: this link (and any older one) is now spent
                user.save(update_fields=["is_active", "last_login"])
                services.membership_set(
                    tenant=portal.tenant, user=user, role=TenantMembership.Role.DEVELOPER, actor=user
                )
        except tokens.BadToken as exc:
            return page(
                request, portal, "portal/message.html", {"title": "E-mail verification", "text": str(exc)}, status=400
            )
        messages.success(request, "Your e-mail address is confirmed. Sign in to continue.")
        return HttpResponseRedirect(reverse("portal:login", args=[portal.tenant.id]))
    return page(request, portal, "portal/verify.html", {"verify_user": user})


# ---------------------------------------------------------------------------
# Sign-in and sign-out
# ---------------------------------------------------------------------------


def _safe_next(request: HttpRequest, portal: Portal) -> str:
    candidate = request.POST.get("next") or request.GET.get("next") or ""
    prefix = reverse("portal:catalog", args=[portal.tenant.id])
    if candidate.startswith(prefix) and url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return reverse("portal:apps", args=[portal.tenant.id])


@require_http_methods(["GET", "POST"])
@portal_page()
def login_view(request: HttpRequest, portal: Portal) -> HttpResponse:
    form = LoginForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        username = form.cleaned_data["username"]
        password = form.cleaned_data["password"]
        ip = _client_ip(request)
        state = lockout.check(username=username, ip=ip)
        if state.locked:
            minutes = max(1, state.retry_after_seconds // 60)
            form.add_error(None, f"Too many failed sign-ins. Wait {minutes} minutes, or reset your password.")
            logger.warning("portal sign-in refused: locked out", extra={"tenant_id": portal.tenant.id, "ip": ip})
            response = page(
                request, portal, "portal/login.html", {"form": form, "next": _safe_next(request, portal)}, status=429
            )
            response["Retry-After"] = str(state.retry_after_seconds)
            return response
        user = authenticate(request, username=username, password=password)
        if user is None:
            pending = User.objects.filter(tokens.PENDING_ACCOUNT, username=username).first()
            if pending is not None and pending.check_password(password):
                form.add_error(None, "Confirm your e-mail address first: open the link we sent you.")
            else:
                lockout.record_failure(username=username, ip=ip)
                form.add_error(None, "Wrong user name or password.")
                status = 400
        elif not TenantMembership.objects.filter(user_id=user.pk, tenant=portal.tenant).exists():
            form.add_error(None, f"This account has no access to the {portal.tenant.name} portal.")
            status = 403
        else:
            lockout.record_success(username=username)
            login(request, user)  # cycles the session key: a planted session id is useless afterwards
            return HttpResponseRedirect(_safe_next(request, portal))
    return page(
        request, portal, "portal/login.html", {"form": form, "next": _safe_next(request, portal)}, status=status
    )


@require_POST
@portal_page()
def logout_view(request: HttpRequest, portal: Portal) -> HttpResponse:
    logout(request)
    messages.info(request, "You are signed out.")
    return HttpResponseRedirect(reverse("portal:catalog", args=[portal.tenant.id]))


# ---------------------------------------------------------------------------
# Password reset
# ---------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@portal_page()
def password_reset(request: HttpRequest, portal: Portal) -> HttpResponse:
    form = TenantPasswordResetForm(request.POST or None, tenant=portal.tenant)
    if request.method == "POST" and form.is_valid():
        throttle = mail_throttle.check_and_count(
            email=form.cleaned_data["email"],
            ip=_client_ip(request),
            purpose="password_reset",
            tenant_id=portal.tenant.id,
        )
        if throttle.throttled:
            return _mail_throttled(request, portal, template="portal/password_reset.html", form=form, throttle=throttle)
        site = urlsplit(settings.SITE_URL)
        form.save(
            request=request,
            # The link is built from SITE_URL; domain_override keeps Django from reading the Host header at all.
            domain_override=site.netloc,
            use_https=site.scheme == "https",
            subject_template_name="portal/email/password_reset_subject.txt",
            email_template_name="portal/email/password_reset.txt",
            extra_email_context={
                "tenant_id": portal.tenant.id,
                "tenant_name": portal.tenant.name,
                "site_url": settings.SITE_URL.rstrip("/"),
            },
        )
        # The same answer whether or not the address belongs to a member, so it reveals nothing.
        return page(request, portal, "portal/password_reset_done.html", {"email": form.cleaned_data["email"]})
    return page(request, portal, "portal/password_reset.html", {"form": form})


class PortalPasswordResetConfirmView(PasswordResetConfirmView):
    """Django's reset-confirm (token moved into the session, off the URL) inside a tenant's portal."""

    template_name = "portal/password_reset_confirm.html"
    portal: Portal

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        self.portal = resolve_portal(request, kwargs.pop("tenant"))
        return super().dispatch(request, *args, **kwargs)

    def get_user(self, uidb64: str) -> Any:
        # A link mailed before staff switched the account off or removed it from this tenant stops working: the
        # same accounts the reset form would mail today (active members of this tenant), and no others.
        user = super().get_user(uidb64)
        if user is None or not user.is_active or not user.memberships.filter(tenant=self.portal.tenant).exists():
            return None
        return user

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {**super().get_context_data(**kwargs), "portal": self.portal, "tenant": self.portal.tenant}

    def get_success_url(self) -> str:
        return reverse("portal:login", args=[self.portal.tenant.id])

    def form_valid(self, form: Any) -> HttpResponse:
        lockout.record_success(username=form.user.get_username())
        messages.success(self.request, "Your password is changed. Sign in with the new one.")
        return super().form_valid(form)


# ---------------------------------------------------------------------------
# Invitations (tenant admins)
# ---------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@portal_page(member=True)
def invite(request: HttpRequest, portal: Portal) -> HttpResponse:
    if not portal.is_admin:
        reason = "Only this portal's administrators can invite developers."
        return page(request, portal, "portal/forbidden.html", {"reason": reason}, status=403)
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        email = form.cleaned_data["email"]
        assert isinstance(request.user, User)  # portal_page(member=True): signed in
        token = tokens.invitation_token(tenant_id=portal.tenant.id, email=email, inviter_id=request.user.pk)
        link = site_link(reverse("portal:signup", args=[portal.tenant.id]) + f"?invite={token}")
        _send(
            request,
            portal,
            to=email,
            template="portal/email/invite.txt",
            context={"link": link, "inviter": request.user},
        )
        messages.success(request, f"Invitation sent to {email}.")
        return HttpResponseRedirect(reverse("portal:invite", args=[portal.tenant.id]))
    return page(request, portal, "portal/invite.html", {"form": form})
