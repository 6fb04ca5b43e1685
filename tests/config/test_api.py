"""The management API's configuration endpoints: schema, export, plan and apply, with the roles of what they touch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apimgmt import config_doc, services
from apimgmt.models import Api, AuditEvent, Tenant
from tests.config.conftest import snapshot

pytestmark = pytest.mark.django_db

V1 = "/mgmt/v1"
CONFIG = f"{V1}/tenants/acme/config/"
NEW_API = {
    "name": "new",
    "base_path": "/api/new",
    "upstream_url": "https://new.example.com",
}


def _document(**sections: Any) -> dict[str, Any]:
    return {"format": config_doc.FORMAT, **sections}


def test_the_schema_is_public_and_the_checked_in_file(client: Any) -> None:
    for path in (f"{V1}/config/schema/", f"{V1}/config/schema"):
        r = client.get(path)
        assert r.status_code == 200
        assert r["Content-Type"] == "application/schema+json"
        assert r.content.decode() == (Path(__file__).resolve().parents[2] / "docs" / "config.schema.json").read_text()


@pytest.mark.parametrize(
    ("who", "export", "plan", "apply"),
    [
        ("alice", 200, 200, 200),  # acme admin
        ("vera", 200, 200, 403),  # acme viewer: reads the internals, changes nothing
        ("bob", 403, 403, 403),  # acme developer: sees the catalog only
        ("carol", 404, 404, 404),  # globex admin: acme does not exist for her
        ("root", 200, 200, 200),  # platform staff
    ],
)
def test_roles_are_those_of_the_objects_the_document_touches(
    world: dict[str, Any],
    alice: User,
    bob: User,
    vera: User,
    carol: User,
    staff: User,
    client_for: Callable[[User], APIClient],
    who: str,
    export: int,
    plan: int,
    apply: int,
) -> None:
    client = client_for(User.objects.get(username=who))
    body = {"document": _document(apis=[NEW_API])}
    before = snapshot("acme")

    assert client.get(CONFIG).status_code == export
    assert client.post(CONFIG + "plan/", body, format="json").status_code == plan
    assert snapshot("acme") == before
    r = client.post(CONFIG + "apply/", body, format="json")
    assert r.status_code == apply, r.content
    assert Api.objects.filter(tenant="acme", api_name="new").exists() == (apply == 200)
    if apply != 200:
        assert r["Content-Type"] == "application/problem+json"
        assert snapshot("acme") == before


def test_anonymous_callers_are_refused(world: dict[str, Any]) -> None:
    assert APIClient().get(CONFIG).status_code == 401
    assert APIClient().post(CONFIG + "apply/", {}, format="json").status_code == 401


def test_export_as_json_or_yaml_is_the_commands_export(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    document = config_doc.export_document(Tenant.objects.get(pk="acme"))
    r = client.get(CONFIG)
    assert r["Content-Type"] == "application/json"
    assert r.content.decode() == config_doc.dump_text(document, "json")
    assert r.json()["apis"][2]["description"] == "Users and their $${placeholders}"  # read back as written
    r = client.get(CONFIG + "?output=yaml")
    assert r["Content-Type"] == "application/yaml; charset=utf-8"
    assert r.content.decode() == config_doc.dump_text(document)
    assert client.get(CONFIG + "?output=xml").status_code == 400


def test_plan_then_apply_with_its_fingerprint_audits_as_the_caller(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    document = client.get(CONFIG).json()
    document["apis"].append(NEW_API)
    r = client.post(CONFIG + "plan/", {"document": document}, format="json")
    assert r.status_code == 200, r.content
    plan = r.json()
    assert plan["summary"] == {"create": 1, "update": 0, "delete": 0, "refused": 0}
    assert plan["changes"] == [{"action": "create", "kind": "api", "name": "new"}]

    r = client.post(CONFIG + "apply/", {"document": document, "fingerprint": plan["fingerprint"]}, format="json")

    assert r.status_code == 200
    assert r.json()["applied"] is True and r.json()["summary"]["create"] == 1
    event = AuditEvent.objects.get(action="api.create", object_id=Api.objects.get(api_name="new").pk)
    assert event.actor == alice
    again = client.post(CONFIG + "apply/", {"document": document}, format="json").json()
    assert again["changes"] == [] and again["applied"] is True


def test_yaml_text_and_variables_in_the_body(
    acme: Tenant, alice: User, client_for: Callable[[User], APIClient]
) -> None:
    text = yaml.safe_dump(_document(apis=[{**NEW_API, "upstream_url": "${NEW_UPSTREAM}"}]))
    client = client_for(alice)
    r = client.post(CONFIG + "apply/", {"text": text}, format="json")
    assert r.status_code == 400
    assert r.json()["errors"] == {"apis[new].upstream_url": ["variable ${NEW_UPSTREAM} is not set."]}
    r = client.post(
        CONFIG + "apply/", {"text": text, "variables": {"NEW_UPSTREAM": "https://n.example.com"}}, format="json"
    )
    assert r.status_code == 200
    assert Api.objects.get().upstream_url == "https://n.example.com"


def test_a_bad_document_is_a_400_naming_each_place_and_changes_nothing(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    before = snapshot("acme")
    document = _document(apis=[{**NEW_API, "retries": 9, "policies": ["nope"]}], plans=[{"name": "x", "colour": 1}])
    r = client.post(CONFIG + "apply/", {"document": document}, format="json")
    assert r.status_code == 400
    assert r["Content-Type"] == "application/problem+json"
    assert r.json()["errors"] == {
        "apis[new].retries": ["9 is greater than the maximum of 5"],
        "plans[x].colour": [
            "unknown field; the fields here are approval, archived, description, name, policies, "
            "websocket_max_connections."
        ],
    }
    assert snapshot("acme") == before
    lone_surrogate = _document(apis=[{**NEW_API, "description": "\ud800"}])
    body = json.dumps({"document": lone_surrogate})  # ASCII with a \ud800 escape, as any JSON encoder may send it
    r = client.post(CONFIG + "apply/", body, content_type="application/json")
    assert r.status_code == 400
    assert r.json()["errors"] == {"apis[new].description": ["text must be valid Unicode (no lone surrogates)."]}
    r = client.post(CONFIG + "apply/", {"document": document, "text": "x"}, format="json")
    assert r.status_code == 400 and "either as `document` or as `text`" in r.json()["errors"]["document"][0]


def test_refused_deletes_are_a_409_carrying_the_plan(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    before = snapshot("acme")
    r = client.post(CONFIG + "apply/", {"document": _document(), "prune": True}, format="json")
    assert r.status_code == 409
    body = r.json()
    assert body["detail"].startswith("Nothing applied: api orders: API 'orders' is deprecated")
    refused = {c["name"]: c["refused"] for c in body["plan"]["changes"] if "refused" in c}
    assert sorted(refused) == ["burst", "orders", "standard", "users"]
    assert snapshot("acme") == before


def test_apply_after_an_edit_made_since_the_plan_is_a_409(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    document = client.get(CONFIG).json()
    fingerprint = client.post(CONFIG + "plan/", {"document": document}, format="json").json()["fingerprint"]
    services.policy_update(policy=world["policies"][0], config={"requests_per_minute": 7}, actor=None)
    before = snapshot("acme")
    r = client.post(CONFIG + "apply/", {"document": document, "fingerprint": fingerprint}, format="json")
    assert r.status_code == 409
    assert "changed since the plan was made" in r.json()["detail"]
    assert snapshot("acme") == before


def test_dry_run_over_the_api_applies_nothing(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    client = client_for(alice)
    before = snapshot("acme")
    r = client.post(CONFIG + "apply/", {"document": _document(apis=[NEW_API]), "dry_run": True}, format="json")
    assert r.status_code == 200 and r.json()["applied"] is False and r.json()["summary"]["create"] == 1
    assert snapshot("acme") == before
