"""Documents and OpenAPI specs that would cost the server far more than their size: refused with a 400 naming why.

A few hundred kilobytes of request must never become gigabytes in memory (variables expanded many times over) or
a 500 (nesting deeper than the interpreter's stack).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from apimgmt import config_doc
from apimgmt.models import Api
from tests.config.conftest import snapshot

pytestmark = pytest.mark.django_db

V1 = "/mgmt/v1"
CONFIG = f"{V1}/tenants/acme/config/"
IMPORT = f"{V1}/apis/import/"


def test_variables_cannot_expand_a_small_body_into_a_huge_document(
    world: dict[str, Any], vera: User, client_for: Callable[[User], APIClient]
) -> None:
    # 200 references to a 100 kB value: 20 MB once expanded, from a request of about 100 kB. A viewer may plan.
    text = (
        f"format: {config_doc.FORMAT}\napis:\n- name: big\n  base_path: /big\n  upstream_url: https://b.example.com\n"
    )
    text += "  description: '" + "${BIG}" * 200 + "'\n"
    client = client_for(vera)
    before = snapshot("acme")
    started = time.monotonic()
    r = client.post(CONFIG + "plan/", {"text": text, "variables": {"BIG": "x" * 100_000}}, format="json")
    assert r.status_code == 400, r.content
    errors = r.json()["errors"]
    assert list(errors) == ["apis[big].description"]
    assert "variables expand to more than 10,000,000 characters" in errors["apis[big].description"][0]
    assert time.monotonic() - started < 10
    assert snapshot("acme") == before


def test_a_deeply_nested_document_is_a_400_not_a_500(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient]
) -> None:
    text = f"format: {config_doc.FORMAT}\nx: " + "[" * 500 + "]" * 500 + "\n"
    r = client_for(alice).post(CONFIG + "plan/", {"text": text}, format="json")
    assert r.status_code == 400, r.content
    assert r["Content-Type"] == "application/problem+json"
    (messages,) = r.json()["errors"].values()
    assert "nested deeper than 100 levels" in messages[0]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.yaml", "openapi: 3.0.3\nx: " + "[" * 500 + "]" * 500 + "\n"),
        ("deep.json", '{"openapi": "3.0.3", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ],
)
def test_a_deeply_nested_openapi_file_is_a_400_not_a_500(
    world: dict[str, Any], alice: User, client_for: Callable[[User], APIClient], name: str, text: str
) -> None:
    apis = Api.objects.count()
    upload = SimpleUploadedFile(name, text.encode(), content_type="application/octet-stream")
    r = client_for(alice).post(IMPORT, {"tenant_id": "acme", "file": upload}, format="multipart")
    assert r.status_code == 400, r.content
    assert "nested deeper than 100 levels" in str(r.json()["errors"])
    assert Api.objects.count() == apis


def test_planning_an_app_owner_does_not_tell_a_viewer_which_user_names_exist(
    world: dict[str, Any], vera: User, carol: User, client_for: Callable[[User], APIClient]
) -> None:
    # carol exists (globex's admin), "nobody-here" does not: for acme's viewer both are just not acme members.
    client = client_for(vera)
    answers = []
    for owner in ("carol", "nobody-here"):
        text = f"format: {config_doc.FORMAT}\nconsumers:\n- {{name: app, owner: {owner}}}\n"
        r = client.post(CONFIG + "plan/", {"text": text}, format="json")
        assert r.status_code == 400, r.content
        answers.append(r.json()["errors"])
    assert answers[0] == {"consumers[carol/app].owner": ["The owner must be a member of this consumer's tenant."]}
    assert answers[1] == {"consumers[nobody-here/app].owner": ["The owner must be a member of this consumer's tenant."]}
