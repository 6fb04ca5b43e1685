"""A key's plaintext appears in exactly one response (create or rotate): never in a later read, log line or audit event."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt.models import AuditEvent, Consumer

pytestmark = pytest.mark.django_db


def test_key_plaintext_is_shown_once_and_nowhere_else(
    bob: User, alice: User, bob_app: Consumer, client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bob_client, alice_client = client_for(bob), client_for(alice)
    bodies: list[str] = []

    def call(client: Any, method: str, path: str, data: Any = None) -> Any:
        response = (
            getattr(client, method)(path, data, format="json") if data is not None else getattr(client, method)(path)
        )
        bodies.append(response.content.decode())
        return response

    created = call(bob_client, "post", "/mgmt/v1/keys/", {"consumer_id": bob_app.pk, "name": "ci"}).json()
    rotated = call(bob_client, "post", f"/mgmt/v1/keys/{created['key_id']}/rotate/", {"overlap_seconds": 10}).json()
    secrets = [created["key"], rotated["key"]]
    for key_id in (created["key_id"], rotated["key_id"]):
        for client in (bob_client, alice_client):
            call(client, "get", f"/mgmt/v1/keys/{key_id}/")
    for client in (bob_client, alice_client):
        call(client, "get", "/mgmt/v1/keys/")
        call(client, "get", f"/mgmt/v1/keys/?consumer_id={bob_app.pk}")
        call(client, "get", "/mgmt/v1/audit-events/")
    call(bob_client, "post", f"/mgmt/v1/keys/{rotated['key_id']}/revoke/")
    call(bob_client, "post", f"/mgmt/v1/keys/{rotated['key_id']}/rotate/", {"overlap_seconds": 10})  # refused: revoked

    for secret in secrets:
        assert sum(secret in body for body in bodies) == 1
        assert secret not in caplog.text
        for event in AuditEvent.objects.all():
            assert secret not in json.dumps(event.changes)
    assert len(caplog.records) > 0  # the capture saw the request logging at all
    assert AuditEvent.objects.filter(action="api_key.create", object_id=created["key_id"]).exists()
