"""The OpenAPI schema and its docs, and schemathesis fuzzing every operation in-process against the WSGI app."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core import signals
from django.db import close_old_connections
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from apimgmt.tokens import api_token_create
from apimgmt.wsgi import application

pytestmark = pytest.mark.django_db

FUZZ_EXAMPLES = 20


def test_schema_documents_every_route_with_request_and_response_schemas(client: Client) -> None:
    r = client.get("/mgmt/schema/?format=json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for route in (
        "tenants",
        "apis",
        "consumers",
        "keys",
        "plans",
        "policies",
        "subscriptions",
        "audit-events",
        "usage",
    ):
        assert f"/mgmt/v1/{route}/" in paths
    assert "/mgmt/v1/keys/{key_id}/rotate/" in paths and "/mgmt/v1/subscriptions/{id}/approve/" in paths
    for path, operations in paths.items():
        for method, operation in operations.items():
            ok = [code for code in operation["responses"] if code.startswith("2")]
            assert ok, (path, method)
            if method in ("post", "put", "patch") and not path.endswith(
                ("/activate/", "/retire/", "/revoke/", "/suspend/", "/block/", "/unblock/")
            ):
                assert "requestBody" in operation, (path, method)
            assert operation["responses"]["400"]["content"]["application/problem+json"]
    create_key = paths["/mgmt/v1/keys/"]["post"]
    assert create_key["responses"]["201"]["content"]["application/json"]["examples"]
    assert paths["/mgmt/v1/usage/"]["get"]["responses"]["200"]["content"]["application/json"]["examples"]
    assert doc["components"]["schemas"]["ApiKeyRequest"]["additionalProperties"] is False


def test_swagger_ui_and_redoc_are_served_with_local_assets(client: Client) -> None:
    for path in ("/mgmt/docs/", "/mgmt/redoc/"):
        r = client.get(path)
        assert r.status_code == 200
        html = r.content.decode()
        assert "cdn.jsdelivr" not in html and "unpkg.com" not in html
        assets = re.findall(r'"(/static/drf_spectacular_sidecar/[^"]+)"', html)
        assert assets, html
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def _generated_schema() -> dict[str, Any]:
    """The document /mgmt/schema/ serves, generated without a request (no database at collection time)."""
    document = SchemaGenerator().get_schema(request=None, public=True)
    loaded: dict[str, Any] = json.loads(OpenApiJsonRenderer().render(document))
    return loaded


@pytest.fixture
def wsgi_in_test_transaction(db: Any) -> Iterator[None]:
    """Let raw WSGI calls share the test's transaction, as Django's test client does: keep the connection open."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


def test_served_schema_is_the_one_fuzzed(client: Client) -> None:
    assert client.get("/mgmt/schema/?format=json").json() == _generated_schema()


@pytest.fixture
def staff_headers(db: Any) -> dict[str, str]:
    user = User.objects.create_superuser("fuzz", "fuzz@example.com", "fuzz-password-123")
    _token, plaintext = api_token_create(user=user, actor=None)
    return {"Authorization": f"Token {plaintext}"}


schema = schemathesis.openapi.from_dict(_generated_schema())
schema.app = application  # calls go in-process through the WSGI app


# positive_data_acceptance is left out on purpose: the schema states shapes, but the API also enforces rules
# no JSON Schema can (base_path syntax and reserved prefixes, per-type policy configs, ids of existing rows),
# and answering those with a 400 is correct. Every other default check runs, including response conformance.
@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_survives_fuzzing_and_matches_its_schema(
    case: Any, staff_headers: dict[str, str], wsgi_in_test_transaction: None
) -> None:
    case.call_and_validate(headers=staff_headers, excluded_checks=[positive_data_acceptance])
