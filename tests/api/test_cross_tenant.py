"""Cross-tenant isolation, generated from the URL conf: tenant B never sees or touches tenant A's objects."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth.models import User
from django.urls import URLPattern, URLResolver, get_resolver

from apimgmt.api import urls as api_urls

pytestmark = pytest.mark.django_db

WRITE_METHODS = ("post", "put", "patch", "delete")


def _v1_routes() -> list[tuple[str, Any]]:
    """(path regex, callback) of every route under /mgmt/v1/, read from the URL conf."""
    routes: list[tuple[str, Any]] = []

    def walk(patterns: list[URLPattern | URLResolver], prefix: str) -> None:
        for pattern in patterns:
            regex = prefix + str(pattern.pattern.regex.pattern).lstrip("^").rstrip("$")
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, regex)
            else:
                routes.append((regex, pattern.callback))

    walk(api_urls.v1, "mgmt/v1/")
    return routes


def _detail_routes() -> list[tuple[str, str, str, str]]:
    """(basename, action, method, path template) for every detail route and method."""
    found = []
    for regex, callback in _v1_routes():
        actions = getattr(callback, "actions", None)
        if not actions or "(?P<" not in regex:
            continue
        basename = callback.initkwargs["basename"]
        template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", regex).replace("\\", "")
        for method, action in actions.items():
            found.append((basename, action, method, "/" + template))
    return found


def _list_routes() -> list[tuple[str, str]]:
    found = []
    for regex, callback in _v1_routes():
        actions = getattr(callback, "actions", None)
        if actions and "(?P<" not in regex and "get" in actions:
            found.append((callback.initkwargs["basename"], "/" + regex.replace("\\", "")))
    return found


def _snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every apimgmt table except the audit log of reads (there are none) and tokens."""
    state = {}
    for model in apps.get_app_config("apimgmt").get_models():
        if model._meta.db_table in ("am_api_tokens",):
            continue
        state[model._meta.db_table] = sorted(map(repr, model.objects.values_list()))  # type: ignore[arg-type]
    return state


DETAIL_ROUTES = _detail_routes()


def test_the_matrix_covers_every_resource() -> None:
    basenames = {basename for basename, *_ in DETAIL_ROUTES}
    assert basenames == {
        "tenant",
        "api",
        "consumer",
        "key",
        "plan",
        "policy",
        "subscription",
        "audit-event",
        "webhook",
        "webhook-delivery",
        "subscription-plan",
        "plan-archive",
        "jwt-issuer",
    }
    assert len(DETAIL_ROUTES) >= 25  # retrieve/update/… plus every action


@pytest.mark.parametrize(("basename", "action", "method", "template"), DETAIL_ROUTES, ids=lambda v: str(v))
def test_other_tenants_object_is_404_for_every_method(
    basename: str, action: str, method: str, template: str, acme_world: dict[str, Any], carol: User, client_for: Any
) -> None:
    obj = acme_world[basename]
    path = re.sub(r"\{\w+\}", str(obj.pk), template)
    client = client_for(carol)
    before = _snapshot()
    response = getattr(client, method)(path, {}, format="json")
    assert response.status_code == 404, (path, method, response.content)
    assert response["Content-Type"] == "application/problem+json"
    assert _snapshot() == before


@pytest.mark.parametrize(("basename", "path"), _list_routes())
def test_no_list_leaks_another_tenants_rows(
    basename: str, path: str, acme_world: dict[str, Any], carol: User, client_for: Any
) -> None:
    c = client_for(carol)
    for query in ("", "?tenant_id=acme"):
        response = c.get(path + query)
        assert response.status_code == 200
        text = response.content.decode()
        assert response.json()["count"] == sum(1 for r in response.json()["results"] if "acme" not in str(r))
        for obj in acme_world.values():
            assert f'"{obj.pk}"' not in text


def test_usage_of_another_tenant_is_empty(acme_world: dict[str, Any], carol: User, client_for: Any) -> None:
    r = client_for(carol).get(
        "/mgmt/v1/usage/?tenant_id=acme&interval=day&from=2025-12-31T00:00:00Z&to=2026-01-02T00:00:00Z"
    )
    assert r.status_code == 200 and r.json()["results"] == []


def test_cannot_create_into_or_reference_another_tenant(
    acme_world: dict[str, Any], carol: User, client_for: Any
) -> None:
    c = client_for(carol)
    before = _snapshot()
    r = c.post("/mgmt/v1/consumers/", {"tenant_id": "acme", "name": "spy"}, format="json")
    assert r.status_code == 400 and "tenant_id" in r.json()["errors"]
    r = c.post("/mgmt/v1/keys/", {"consumer_id": acme_world["consumer"].pk}, format="json")
    assert r.status_code == 400 and "consumer_id" in r.json()["errors"]
    r = c.post(
        "/mgmt/v1/plans/",
        {"tenant_id": "globex", "name": "steal", "policies": [acme_world["policy"].pk]},
        format="json",
    )
    assert r.status_code == 400 and "policies" in r.json()["errors"]
    assert _snapshot() == before


def test_plan_api_links_stay_inside_a_tenant(acme_world: dict[str, Any], carol: User, client_for: Any) -> None:
    """An API offers only its own tenant's plans; another tenant can neither link, see nor use those links."""
    from apimgmt import services

    acme_api, acme_plan = acme_world["api"], acme_world["plan"]
    services.api_update(api=acme_api, plans=[acme_plan], actor=None)
    c = client_for(carol)
    before = _snapshot()
    r = c.post(
        "/mgmt/v1/apis/",
        {
            "tenant_id": "globex",
            "api_name": "g",
            "base_path": "/globex/g",
            "upstream_url": "https://g.example.com",
            "plans": [acme_plan.pk],
        },
        format="json",
    )
    assert r.status_code == 400, r.content
    assert r.json()["errors"]["plans"] == [f"Unknown plans for this tenant: {acme_plan.pk}."]
    assert _snapshot() == before
    r = c.post(
        "/mgmt/v1/apis/",
        {"tenant_id": "globex", "api_name": "g", "base_path": "/globex/g", "upstream_url": "https://g.example.com"},
        format="json",
    )
    assert r.status_code == 201 and r.json()["plans"] == []
    globex_api = r.json()["id"]
    r = c.patch(f"/mgmt/v1/apis/{globex_api}/", {"plans": [acme_plan.pk]}, format="json")
    assert r.status_code == 400 and "plans" in r.json()["errors"]
    r = c.patch(f"/mgmt/v1/apis/{acme_api.pk}/", {"plans": []}, format="json")
    assert r.status_code == 404
    assert list(acme_api.plans.all()) == [acme_plan]
    r = c.post("/mgmt/v1/consumers/", {"tenant_id": "globex", "name": "g-app"}, format="json")
    c.post(f"/mgmt/v1/apis/{globex_api}/activate/", {}, format="json")
    r = c.post(
        "/mgmt/v1/subscriptions/",
        {"consumer_id": r.json()["id"], "api_id": globex_api, "plan_id": acme_plan.pk},
        format="json",
    )
    assert r.status_code == 400 and "plan_id" in r.json()["errors"], r.content
    listed = c.get("/mgmt/v1/apis/").content.decode()
    assert acme_plan.pk not in listed and acme_api.pk not in listed


def test_url_conf_resolves_v1_under_mgmt() -> None:
    assert get_resolver().resolve("/mgmt/v1/apis/").url_name == "api-list"
