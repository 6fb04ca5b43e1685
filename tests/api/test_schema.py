"""The OpenAPI schema and its docs, and schemathesis fuzzing every operation against the app under gunicorn."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connections
from django.db.models import Model
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from apimgmt import services
from apimgmt.models import AuditEvent, Subscription, Tenant, UsageRecord
from apimgmt.tokens import api_token_create
from tests.support.servers import app_server_env, gunicorn

pytestmark = pytest.mark.django_db

# Fuzzing-phase examples per operation; the examples and coverage phases add their own (deterministic) cases.
FUZZ_EXAMPLES = 5


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
                (
                    "/activate/",
                    "/retire/",
                    "/revoke/",
                    "/suspend/",
                    "/block/",
                    "/unblock/",
                    "/archive/",
                    "/unarchive/",
                    "/enable/",
                    "/disable/",
                    "/replay/",
                )
            ):
                assert "requestBody" in operation, (path, method)
            assert operation["responses"]["400"]["content"]["application/problem+json"]
    create_key = paths["/mgmt/v1/keys/"]["post"]
    assert create_key["responses"]["201"]["content"]["application/json"]["examples"]
    assert paths["/mgmt/v1/usage/"]["get"]["responses"]["200"]["content"]["application/json"]["examples"]
    assert doc["components"]["schemas"]["ApiKeyRequest"]["additionalProperties"] is False


def test_schema_generates_without_warnings_and_validates(tmp_path: Path) -> None:
    """A warning means a wrong schema: two serializers named "Plan" made one component stand for both, and enum
    collisions renamed SubscriptionStatusEnum to a hash. Clients generated from the schema break on either."""
    call_command("spectacular", "--fail-on-warn", "--validate", "--file", str(tmp_path / "schema.yml"))
    components = _generated_schema()["components"]["schemas"]
    assert {"Plan", "ConfigPlan", "ApiStatusEnum", "SubscriptionStatusEnum"} <= set(components)
    assert "policies" in components["Plan"]["properties"]


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


def test_served_schema_is_the_one_fuzzed(client: Client) -> None:
    assert client.get("/mgmt/schema/?format=json").json() == _generated_schema()


# ---------------------------------------------------------------------------
# Fuzzing against gunicorn
# ---------------------------------------------------------------------------
#
# Ids of rows that do not exist only reach the 404 and "unknown id" branches. So every test starts from one seeded
# world (tenant acme and one object of each kind, under fixed ids), and the fuzzed copy of the schema pins the path
# ids and the id fields of request bodies to those rows. Schemathesis still generates other values for them, which
# the API must refuse (404, 400); the pinned ones reach the real rows, their updates and their answers, which is where
# a response that breaks its schema shows up. Query filters stay unpinned: filtering by an unknown id is valid (an
# empty page), not something to refuse.

TENANT = "acme"
SEEDED = {
    "api": "api_fuzzSeeded",
    "consumer": "con_fuzzSeeded",
    "key": "key_fuzzSeeded",
    "plan": "pln_fuzzSeeded",
    "policy": "pol_fuzzSeeded",
    "subscription": "sub_fuzzSeeded",
    "audit-event": "1",  # replaced: the seeded tenant's first event (a sequence value) must exist, see seeded_world
}
# Which seeded row a path segment's {id} or a request body field means.
RESOURCE_OF_SEGMENT = {
    "apis": "api",
    "audit-events": "audit-event",
    "consumers": "consumer",
    "keys": "key",
    "plans": "plan",
    "policies": "policy",
    "subscriptions": "subscription",
}
RESOURCE_OF_FIELD = {"consumer_id": "consumer", "api_id": "api", "plan_id": "plan"}


def _pinned(value: str) -> dict[str, Any]:
    return {"type": "string", "enum": [value]}


def _fuzzed_schema() -> dict[str, Any]:
    """The served schema with ids pinned to the seeded world (see above)."""
    schema = copy.deepcopy(_generated_schema())
    for path, operations in schema["paths"].items():
        segment = path.split("/")[3]
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] != "path":
                    continue
                if segment == "tenants":
                    parameter["schema"] = _pinned(TENANT)
                elif segment in RESOURCE_OF_SEGMENT:
                    parameter["schema"] = _pinned(SEEDED[RESOURCE_OF_SEGMENT[segment]])
                # A resource the seeded world has no row of keeps its generated ids (404s, still checked).
    for name, component in schema["components"]["schemas"].items():
        if not name.endswith("Request"):
            continue
        properties = component.get("properties", {})
        if "tenant_id" in properties:
            properties["tenant_id"] = _pinned(TENANT)
        for field, resource in RESOURCE_OF_FIELD.items():
            if field in properties:
                properties[field] = _pinned(SEEDED[resource])
        if "policies" in properties:
            properties["policies"]["items"] = _pinned(SEEDED["policy"])
    return schema


M = TypeVar("M", bound=Model)


def _under_fixed_id(obj: M, resource: str) -> M:
    """Give a row just created by a service (nothing refers to it yet) its seeded id."""
    model = type(obj)
    model._default_manager.filter(pk=obj.pk).update(**{model._meta.pk.attname: SEEDED[resource]})
    return model._default_manager.get(pk=SEEDED[resource])


@pytest.fixture(scope="module")
def committing_thread(django_db_setup: Any, django_db_blocker: Any) -> Iterator[ThreadPoolExecutor]:
    """A thread for the seeding, whose database connection commits as it goes, so gunicorn sees the rows.

    The test's own connection sits in pytest-django's rollback-only transaction; connections are per thread. This
    costs one cleanup per operation instead of a flush per operation (about a second each on a busy machine, with
    the partitioned usage tables). At the end the tables are left empty, as every other test expects them.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-seed") as executor, django_db_blocker.unblock():
        yield executor
        executor.submit(_clear_world).result()
        executor.submit(connections.close_all).result()


@pytest.fixture(scope="module")
def fuzz_server(django_db_setup: Any, django_db_blocker: Any) -> Iterator[str]:
    """The app under gunicorn (production worker class and config), on the test database, for the whole module."""
    with django_db_blocker.unblock():
        env = app_server_env()
    with gunicorn(env, workers=1) as base_url:  # one client, one request at a time
        yield base_url


@pytest.fixture(scope="module")
def fuzz_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _clear_world() -> None:
    """Remove every row the seeding or the fuzzing made (a tenant takes its APIs, consumers, keys … with it)."""
    Subscription.objects.all().delete()  # plans are protected while subscriptions use them
    Tenant.objects.all().delete()
    AuditEvent.objects.all().delete()
    User.objects.all().delete()


@pytest.fixture
def seeded_world(committing_thread: ThreadPoolExecutor) -> str:
    """A staff token, for the world seeded afresh for this operation (what the previous one changed is gone)."""
    return committing_thread.submit(_seed_world).result()


def _seed_world() -> str:
    """One object of every kind in tenant acme under the SEEDED ids, and a platform staff token.

    The consumer has no owner (made by staff), the subscription waits for approval, the API has a target and a
    policy: each a state the answers must describe truthfully.
    """
    _clear_world()
    staff = User.objects.create_superuser("fuzz", "fuzz@example.com", "fuzz-password-123")
    _token, plaintext = api_token_create(user=staff, actor=None)
    tenant = services.tenant_create(id=TENANT, name="Acme", actor=staff)
    policy = _under_fixed_id(
        services.policy_create(
            tenant=tenant,
            name="standard",
            policy_type="rate_limiting",
            config={"requests_per_minute": 100},
            actor=staff,
        ),
        "policy",
    )
    plan = _under_fixed_id(services.plan_create(tenant=tenant, name="gold", actor=staff), "plan")
    services.plan_update(plan=plan, policies=[policy], actor=staff)
    api = _under_fixed_id(
        services.api_create(
            tenant=tenant,
            api_name="users",
            base_path="/users/v1",
            upstream_url="https://users.example.com",
            status="active",
            subscription_approval="manual",
            actor=staff,
        ),
        "api",
    )
    services.api_update(api=api, policies=[policy], targets=[("https://users-2.example.com", 2)], actor=staff)
    consumer = _under_fixed_id(services.consumer_create(tenant=tenant, name="billing", actor=staff), "consumer")
    key = _under_fixed_id(services.api_key_create(consumer=consumer, name="default", actor=staff)[0], "key")
    _under_fixed_id(services.subscription_request(consumer=consumer, api=api, plan=plan, actor=staff), "subscription")
    UsageRecord.objects.create(
        tenant=tenant,
        api_id=api.pk,
        consumer_id=consumer.pk,
        key_id=key.pk,
        timestamp=key.created_at.replace(second=0, microsecond=0),
        status_code=200,
        request_count=3,
    )
    # Audit event ids come from a sequence: the first event moves to the pinned id (free: the table starts empty).
    first = AuditEvent.objects.earliest("id")
    AuditEvent.objects.filter(pk=first.pk).update(id=int(SEEDED["audit-event"]))
    return plaintext


fuzzed = schemathesis.openapi.from_dict(_fuzzed_schema())


# All three phases run (examples, coverage, fuzzing; schemathesis' defaults) with every default check: among them
# not_a_server_error, response_schema_conformance and content_type_conformance. positive_data_acceptance is left
# out on purpose: the schema states shapes, but the API also enforces rules no JSON Schema can (base_path syntax
# and reserved prefixes, per-type policy configs, state transitions), and answering those with a 400 is correct.
@fuzzed.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_survives_fuzzing_under_gunicorn_and_matches_its_schema(
    case: Any, fuzz_server: str, fuzz_session: requests.Session, seeded_world: str
) -> None:
    case.call_and_validate(
        base_url=fuzz_server,
        session=fuzz_session,
        headers={"Authorization": f"Token {seeded_world}"},
        excluded_checks=[positive_data_acceptance],
    )


def test_the_fuzzing_runs_every_phase_and_the_checks_that_found_past_defects() -> None:
    """Pinned so a schemathesis upgrade or a config file cannot quietly narrow the run above."""
    phases = fuzzed.config.phases
    assert phases.examples.enabled and phases.coverage.enabled and phases.fuzzing.enabled
    checks = fuzzed.config.checks
    for name in ("not_a_server_error", "response_schema_conformance", "content_type_conformance"):
        assert getattr(checks, name).enabled, name


@pytest.mark.parametrize("kind", ["[", '{"a":'])
def test_a_body_nested_1000_deep_is_a_400_problem_under_gunicorn(
    kind: str, fuzz_server: str, fuzz_session: requests.Session, seeded_world: str
) -> None:
    """Under the production worker (gevent) too: the parser's depth limit, not a RecursionError and an HTML 500."""
    closing = "]" if kind == "[" else "}"
    body = kind * 1000 + ("" if kind == "[" else "1") + closing * 1000
    r = fuzz_session.post(
        f"{fuzz_server}/mgmt/v1/consumers/",
        data=body,
        headers={"Authorization": f"Token {seeded_world}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400, r.text[:200]
    assert r.headers["Content-Type"] == "application/problem+json"
    assert "nested deeper than 64 levels" in r.json()["detail"]
