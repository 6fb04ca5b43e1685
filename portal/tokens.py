"""Signed, expiring links for e-mail verification and invitations (no table: django.core.signing does it).

A verification token also carries a fingerprint of the account's state, so it
stops working the moment it has been used (the account becomes active) or the
password changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.core import signing
from django.utils.crypto import constant_time_compare, salted_hmac

VERIFY_SALT = "portal.verify-email"
INVITE_SALT = "portal.invite"
VERIFY_MAX_AGE = 3 * 86400
INVITE_MAX_AGE = 7 * 86400


class BadToken(Exception):
    """The link is malformed, tampered with, expired or already used; the message says which, for the page."""


def _fingerprint(user: User) -> str:
    return salted_hmac(VERIFY_SALT, f"{user.pk}:{user.password}:{user.is_active}").hexdigest()[:20]


def verification_token(*, user: User, tenant_id: str) -> str:
    return signing.dumps({"u": user.pk, "t": tenant_id, "f": _fingerprint(user)}, salt=VERIFY_SALT, compress=True)


def check_verification_token(token: str, *, tenant_id: str) -> User:
    """The (still inactive) user the link was sent to."""
    try:
        data = signing.loads(token, salt=VERIFY_SALT, max_age=VERIFY_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise BadToken("This verification link has expired. Sign up again to get a new one.") from exc
    except signing.BadSignature as exc:
        raise BadToken("This verification link is not valid. Copy the whole link from the e-mail.") from exc
    if not isinstance(data, dict) or data.get("t") != tenant_id:
        raise BadToken("This verification link is for another portal.")
    user_id = data.get("u")
    user = User.objects.filter(pk=user_id).first() if isinstance(user_id, int) else None
    if user is None or not constant_time_compare(_fingerprint(user), str(data.get("f", ""))):
        raise BadToken("This verification link has already been used. You can sign in.")
    return user


@dataclass(frozen=True)
class Invitation:
    tenant_id: str
    email: str


def invitation_token(*, tenant_id: str, email: str) -> str:
    return signing.dumps({"t": tenant_id, "e": email.strip().lower()}, salt=INVITE_SALT, compress=True)


def check_invitation_token(token: str, *, tenant_id: str) -> Invitation:
    try:
        data = signing.loads(token, salt=INVITE_SALT, max_age=INVITE_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise BadToken("This invitation has expired. Ask the portal's admin for a new one.") from exc
    except signing.BadSignature as exc:
        raise BadToken("This invitation link is not valid. Copy the whole link from the e-mail.") from exc
    if not isinstance(data, dict) or data.get("t") != tenant_id or not data.get("e"):
        raise BadToken("This invitation is for another portal.")
    return Invitation(tenant_id=tenant_id, email=str(data["e"]))
