"""Signed, expiring links for e-mail verification and invitations (no table: django.core.signing does it).

A verification link is single-use for good. Confirming an address stamps the
account's ``last_login``, which is in the link's fingerprint together with the
password, ``is_active`` and the address: once confirmed, the link never matches
again, even after staff switch the account off (``is_active`` back to False),
so a deactivated developer cannot sign themselves back in with an old mail.
"Inactive and never signed in" (``PENDING_ACCOUNT``) is therefore exactly
"signed up, address not yet confirmed".

An invitation carries the inviting admin: it works only while that user is
still an active admin of the tenant, so demoting or removing an admin withdraws
the invitations they sent. It is single-use because the invited address then
has an account, which a second sign-up with it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.core import signing
from django.db.models import Q
from django.utils.crypto import constant_time_compare, salted_hmac

from apimgmt.models import TenantMembership

VERIFY_SALT = "portal.verify-email"
INVITE_SALT = "portal.invite"
VERIFY_MAX_AGE = 3 * 86400
INVITE_MAX_AGE = 7 * 86400

# Signed up, address not confirmed yet: confirming (or any sign-in) sets last_login for good.
PENDING_ACCOUNT = Q(is_active=False, last_login__isnull=True)


class BadToken(Exception):
    """The link is malformed, tampered with, expired or already used; the message says which, for the page."""


def _fingerprint(user: User) -> str:
    last_login = user.last_login.isoformat() if user.last_login else ""
    state = f"{user.pk}:{user.password}:{user.is_active}:{last_login}:{user.email.lower()}"
    return salted_hmac(VERIFY_SALT, state).hexdigest()[:20]


def verification_token(*, user: User, tenant_id: str) -> str:
    return signing.dumps({"u": user.pk, "t": tenant_id, "f": _fingerprint(user)}, salt=VERIFY_SALT, compress=True)


def check_verification_token(token: str, *, tenant_id: str, lock: bool = False) -> User:
    """The (still unconfirmed) user the link was sent to; ``lock`` reads the row FOR UPDATE (in a transaction)."""
    try:
        data = signing.loads(token, salt=VERIFY_SALT, max_age=VERIFY_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise BadToken("This verification link has expired. Sign up again to get a new one.") from exc
    except signing.BadSignature as exc:
        raise BadToken("This verification link is not valid. Copy the whole link from the e-mail.") from exc
    if not isinstance(data, dict) or data.get("t") != tenant_id:
        raise BadToken("This verification link is for another portal.")
    user_id = data.get("u")
    users = User.objects.select_for_update() if lock else User.objects.all()
    user = users.filter(PENDING_ACCOUNT, pk=user_id).first() if isinstance(user_id, int) else None
    if user is None or not constant_time_compare(_fingerprint(user), str(data.get("f", ""))):
        raise BadToken("This verification link has already been used. You can sign in.")
    return user


@dataclass(frozen=True)
class Invitation:
    tenant_id: str
    email: str


def invitation_token(*, tenant_id: str, email: str, inviter_id: int) -> str:
    payload = {"t": tenant_id, "e": email.strip().lower(), "i": inviter_id}
    return signing.dumps(payload, salt=INVITE_SALT, compress=True)


def check_invitation_token(token: str, *, tenant_id: str) -> Invitation:
    try:
        data = signing.loads(token, salt=INVITE_SALT, max_age=INVITE_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise BadToken("This invitation has expired. Ask the portal's admin for a new one.") from exc
    except signing.BadSignature as exc:
        raise BadToken("This invitation link is not valid. Copy the whole link from the e-mail.") from exc
    if not isinstance(data, dict) or data.get("t") != tenant_id or not data.get("e"):
        raise BadToken("This invitation is for another portal.")
    inviter_id = data.get("i")
    still_admin = isinstance(inviter_id, int) and (
        TenantMembership.objects.filter(
            user_id=inviter_id, user__is_active=True, tenant_id=tenant_id, role=TenantMembership.Role.ADMIN
        ).exists()
    )
    if not still_admin:
        raise BadToken("This invitation was withdrawn. Ask the portal's admin for a new one.")
    return Invitation(tenant_id=tenant_id, email=str(data["e"]))
