"""The client address in audit events: X-Forwarded-For counts only through TRUSTED_PROXIES (apimgmt.client_address)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apimgmt.client_address import client_address, trusted_networks
from apimgmt.models import AuditEvent, Tenant

V1 = "/mgmt/v1"
PROXIES = ["10.0.0.0/8", "192.0.2.1"]


def _create_app(client: APIClient, name: str, **meta: str) -> str | None:
    response = client.post(f"{V1}/consumers/", {"tenant_id": "acme", "name": name}, format="json", **meta)
    assert response.status_code == 201, response.content
    return AuditEvent.objects.get(action="consumer.create", object_id=response.json()["id"]).ip


@pytest.fixture
def trusted(settings: Any) -> None:
    settings.GATEWAY = {**settings.GATEWAY, "TRUSTED_PROXIES": PROXIES}


def test_audit_ip_is_the_client_behind_a_trusted_proxy(
    trusted: None, acme: Tenant, alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    via_proxy = {"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": "203.0.113.7, 10.9.9.9"}
    assert _create_app(client, "via-proxy", **via_proxy) == "203.0.113.7"
    # From a peer that is not a trusted proxy the header is the client's own claim: ignored.
    spoofed = {"REMOTE_ADDR": "198.51.100.20", "HTTP_X_FORWARDED_FOR": "203.0.113.7"}
    assert _create_app(client, "direct", **spoofed) == "198.51.100.20"


def test_audit_ip_honours_trusted_proxies_without_the_request_context_middleware(
    trusted: None, acme: Tenant, alice: User, client_for: Callable[[User], APIClient], settings: Any
) -> None:
    # RequestContextMixin binds the address itself when no middleware did (a project mounting the API elsewhere).
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != "apimgmt.middleware.RequestContextMiddleware"]
    ip = _create_app(client_for(alice), "no-mw", REMOTE_ADDR="10.1.2.3", HTTP_X_FORWARDED_FOR="203.0.113.8")
    assert ip == "203.0.113.8"


def test_a_hop_that_is_not_an_address_gives_the_proxys_address_not_a_500(
    trusted: None, acme: Tenant, alice: User, client_for: Callable[[User], APIClient]
) -> None:
    ip = _create_app(client_for(alice), "garbage", REMOTE_ADDR="10.1.2.3", HTTP_X_FORWARDED_FOR="unknown")
    assert ip == "10.1.2.3"


NETWORKS = trusted_networks(tuple(PROXIES))


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.1", "203.0.113.7", "198.51.100.1"),  # untrusted peer: its claim is ignored
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", "203.0.113.7", "203.0.113.7"),
        ("10.0.0.1", "1.1.1.1, 203.0.113.7, 10.0.0.2", "203.0.113.7"),  # nearest untrusted hop, not the first
        ("10.0.0.1", "10.0.0.3, 192.0.2.1", "10.0.0.3"),  # all trusted: the farthest
        ("10.0.0.1", "203.0.113.7, 10.0.0.2:8080", "10.0.0.1"),  # not an address: stop at the last trusted one
        ("10.0.0.1", "unknown, 10.0.0.2", "10.0.0.2"),
        ("10.0.0.1", "2001:DB8::0001", "2001:db8::1"),  # canonical form
        ("", "203.0.113.7", ""),  # a Unix socket peer is never trusted
    ],
)
def test_the_one_rule(peer: str, forwarded: str, expected: str) -> None:
    assert client_address(peer, forwarded, NETWORKS) == expected


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.0.0.1", "203.0.113.7", ()) == "10.0.0.1"
