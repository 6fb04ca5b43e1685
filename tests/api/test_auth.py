"""Token and session authentication of the management API, and the create_api_token command."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from apimgmt.models import ApiToken, AuditEvent
from apimgmt.tokens import api_token_create, api_token_revoke, hash_token

pytestmark = pytest.mark.django_db


def test_command_prints_a_working_token_once_and_stores_only_its_hash(alice: User) -> None:
    out, err = StringIO(), StringIO()
    call_command("create_api_token", "alice", "--name", "ci", stdout=out, stderr=err)
    plaintext = out.getvalue().strip()
    token = ApiToken.objects.get(user=alice, name="ci")
    assert token.token_hash == hash_token(plaintext) and plaintext not in err.getvalue()
    assert not ApiToken.objects.filter(token_hash=plaintext).exists()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
    assert client.get("/mgmt/v1/tenants/").json()["results"][0]["id"] == "acme"
    event = AuditEvent.objects.get(action="api_token.create", object_id=str(token.pk))
    assert plaintext not in str(event.changes)


def test_command_refuses_an_unknown_user(db: Any) -> None:
    with pytest.raises(CommandError, match="No user named 'ghost'"):
        call_command("create_api_token", "ghost", stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("header", ["", "Token", "Token nope", "Bearer abc", "Token amt_" + "x" * 40])
def test_missing_or_bad_token_is_401_problem(header: str, acme: Any) -> None:
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    r = client.get("/mgmt/v1/apis/")
    assert r.status_code == 401 and r["Content-Type"] == "application/problem+json"
    assert r["WWW-Authenticate"] == "Token"


def test_revoked_and_expired_tokens_stop_working(alice: User) -> None:
    token, plaintext = api_token_create(user=alice, actor=None)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
    assert client.get("/mgmt/v1/apis/").status_code == 200
    assert ApiToken.objects.get(pk=token.pk).last_used_at is not None
    api_token_revoke(token=token, actor=alice)
    assert client.get("/mgmt/v1/apis/").status_code == 401
    token2, plaintext2 = api_token_create(user=alice, actor=None, expires_at=timezone.now() + timedelta(hours=1))
    ApiToken.objects.filter(pk=token2.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    client.credentials(HTTP_AUTHORIZATION=f"Token {plaintext2}")
    assert client.get("/mgmt/v1/apis/").status_code == 401


def test_session_login_works_for_browsers_with_csrf(alice: User) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get("/mgmt/v1/apis/").status_code == 200
    r = client.post("/mgmt/v1/consumers/", {"tenant_id": "acme", "name": "x"}, format="json")
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
