"""A plan's own cap on open WebSocket connections per key: it wins over the API's; empty, the API's applies."""

from __future__ import annotations

import time

import pytest
from rest_framework.test import APIClient
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from apimgmt import services
from apimgmt.models import Plan
from apimgmt.tokens import api_token_create
from tests.gateway.conftest import publish, subscribe
from tests.gateway.test_websocket import _connect, _wait_routable
from tests.gateway.test_websocket import live_gateway as live_gateway  # a fixture
from tests.gateway.test_websocket import ws_upstream as ws_upstream  # a fixture


def _refused_at(url: str, key: str, held: list[ClientConnection], limit: int = 10) -> InvalidStatus:
    """Open connections with ``key`` until one is refused; the refusal (what was opened is in ``held``)."""
    for _ in range(limit):
        try:
            held.append(_connect(url, key))
        except InvalidStatus as refused:
            return refused
    raise AssertionError(f"{limit} connections and none refused")


def test_the_plans_cap_wins_over_the_apis_and_an_empty_one_leaves_the_apis(
    live_gateway, acme, bob_app, bob_key, ws_upstream
) -> None:
    _, key = bob_key
    plan = services.plan_create(tenant=acme, name="chat-small", actor=None, websocket_max_connections=2)
    api = publish(acme, ws_upstream.url + "/svc", websocket=True, websocket_max_connections=4)
    subscribe(bob_app, api, plan)
    url = live_gateway + "/api/users/v1/echo"
    _wait_routable(url, key)
    held: list[ClientConnection] = []
    try:
        refused = _refused_at(url, key, held)
        assert len(held) == 2
        assert refused.response.status_code == 429
        assert refused.response.headers["Content-Type"] == "application/problem+json"
        assert b"2 open WebSocket connection" in refused.response.body
        assert b'"max_connections": 2' in refused.response.body or b'"max_connections":2' in refused.response.body

        services.plan_update(plan=plan, actor=None, websocket_max_connections=None)  # the API's cap again
        deadline = time.monotonic() + 10
        while True:  # every worker reloads its routes within a poll
            refused = _refused_at(url, key, held)
            if len(held) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(held) == 4
        assert b"4 open WebSocket connection" in refused.response.body
    finally:
        for ws in held:
            ws.close()


@pytest.mark.django_db
def test_a_plans_cap_is_set_through_the_management_api_and_checked(alice, acme) -> None:
    _token, plaintext = api_token_create(user=alice, actor=None, name="tests")
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Token {plaintext}")
    r = c.post("/mgmt/v1/plans/", {"tenant_id": "acme", "name": "chat", "websocket_max_connections": 3}, format="json")
    assert r.status_code == 201, r.json()
    plan_id = r.json()["id"]
    assert r.json()["websocket_max_connections"] == 3
    for bad in (0, 100_001, "many"):
        r = c.patch(f"/mgmt/v1/plans/{plan_id}/", {"websocket_max_connections": bad}, format="json")
        assert r.status_code == 400, bad
        assert "websocket_max_connections" in r.json()["errors"]
    r = c.patch(f"/mgmt/v1/plans/{plan_id}/", {"websocket_max_connections": None}, format="json")
    assert r.status_code == 200 and r.json()["websocket_max_connections"] is None
    assert Plan.objects.get(pk=plan_id).websocket_max_connections is None
    assert (
        c.post("/mgmt/v1/plans/", {"tenant_id": "acme", "name": "plain"}, format="json").json()[
            "websocket_max_connections"
        ]
        is None
    )


@pytest.mark.django_db
def test_a_plans_cap_travels_in_configuration_documents(acme, tmp_path) -> None:
    from io import StringIO

    from django.core.management import call_command

    def config(*args: str) -> int:
        try:
            call_command("config", *args, stdout=StringIO(), stderr=StringIO())
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    services.plan_create(tenant=acme, name="chat", actor=None, websocket_max_connections=3)
    services.plan_create(tenant=acme, name="plain", actor=None)
    exported = tmp_path / "acme.yaml"
    assert config("export", "--tenant", "acme", "-o", str(exported)) == 0
    text = exported.read_text()
    assert "- name: chat\n" in text and "  websocket_max_connections: 3\n" in text
    assert "  websocket_max_connections: null\n" in text  # plain: the API's cap

    exported.write_text(text.replace("websocket_max_connections: 3", "websocket_max_connections: 7"))
    assert config("apply", "--tenant", "acme", "-f", str(exported)) in (0, 2)
    assert Plan.objects.get(tenant=acme, name="chat").websocket_max_connections == 7
    exported.write_text(text.replace("websocket_max_connections: 3", "websocket_max_connections: 0"))
    assert config("apply", "--tenant", "acme", "-f", str(exported)) not in (0, 2)  # below the minimum: refused
    assert Plan.objects.get(tenant=acme, name="chat").websocket_max_connections == 7
