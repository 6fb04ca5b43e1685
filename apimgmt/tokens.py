"""Management API tokens: creation (plaintext shown once), revocation and lookup by SHA-256."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Any, cast

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apimgmt.ids import random_base62
from apimgmt.models import ApiToken
from apimgmt.services import Actor, audit_record

TOKEN_PREFIX = "amt_"
TOKEN_RANDOM_LENGTH = 40
DISPLAY_PREFIX_LENGTH = 12
# last_used_at is a hint for humans; writing it on every request would make each call a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(plaintext: str) -> str:
    """SHA-256 hex: tokens carry 238 bits of randomness, so a fast unsalted hash is enough."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogateescape")).hexdigest()


def _tenant_of(user: AbstractBaseUser) -> str | None:
    membership = user.memberships.order_by("tenant_id").first()  # type: ignore[attr-defined]
    return membership.tenant_id if membership else None


@transaction.atomic
def api_token_create(
    *, user: AbstractBaseUser, actor: Actor, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """Create a token for ``user`` and return it with its plaintext — the only time the plaintext exists."""
    if not user.is_active:
        raise ValidationError({"user": "This user is inactive; activate it before giving it a token."})
    if len(name) > 100:
        raise ValidationError({"name": "name must be at most 100 characters."})
    if expires_at is not None:
        if timezone.is_naive(expires_at):
            raise ValidationError({"expires_at": "expires_at must include a time zone (e.g. 2027-01-01T00:00:00Z)."})
        if expires_at <= timezone.now():
            raise ValidationError({"expires_at": "expires_at must be in the future."})
    plaintext = TOKEN_PREFIX + random_base62(TOKEN_RANDOM_LENGTH)
    token = ApiToken.objects.create(
        user=cast(Any, user),  # AUTH_USER_MODEL; typed as the base class so any user model fits
        name=name,
        token_prefix=plaintext[:DISPLAY_PREFIX_LENGTH],
        token_hash=hash_token(plaintext),
        expires_at=expires_at,
    )
    audit_record(
        actor=actor,
        tenant_id=_tenant_of(user),
        action="api_token.create",
        obj=token,
        changes={
            "user": user.get_username(),
            "name": name,
            "token_prefix": token.token_prefix,
            "expires_at": expires_at,
        },
    )
    return token, plaintext


@transaction.atomic
def api_token_revoke(*, token: ApiToken, actor: Actor) -> ApiToken:
    """Revoke for good; revoking twice is harmless."""
    token = ApiToken.objects.select_for_update().select_related("user").get(pk=token.pk)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            tenant_id=_tenant_of(token.user),
            action="api_token.revoke",
            obj=token,
            changes={"token_prefix": token.token_prefix},
        )
    return token


def api_token_authenticate(plaintext: str) -> ApiToken | None:
    """The usable token with this plaintext (its user loaded), or None; refreshes last_used_at now and then."""
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) != len(TOKEN_PREFIX) + TOKEN_RANDOM_LENGTH:
        return None
    digest = hash_token(plaintext)
    token = ApiToken.objects.select_related("user").filter(token_hash=digest).first()
    # The lookup is by hash; compare again in constant time so a future non-unique index cannot match loosely.
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    moment = timezone.now()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= moment):
        return None
    if not token.user.is_active:
        return None
    if token.last_used_at is None or moment - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=moment)
        token.last_used_at = moment
    return token
