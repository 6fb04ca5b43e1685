"""Applying a large document: routes checked once for the whole document (with the same rule as one API at a time,
on the tenant's routes as the document leaves them), and a bounded number of queries per object created."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apimgmt import config_doc, services
from apimgmt.models import Api, AuditEvent, Tenant
from tests.config.conftest import snapshot

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]
HEADER = "format: apimgmt/config/v1\n"


def _api(name: str, base_path: str, host: str = "") -> str:
    bound = f", host: {host}" if host else ""
    return f"- {{name: {name}, base_path: {base_path}{bound}, upstream_url: 'https://{name}.example.com'}}\n"


def _apply(run_config: Run, tmp_path: Path, text: str, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "acme.yaml"
    path.write_text(text)
    return run_config("apply", "--tenant", "acme", "-f", str(path), *extra)


def _acme_routes() -> set[str]:
    return set(Api.objects.filter(tenant="acme").values_list("base_path", flat=True))


def test_a_route_under_the_tenants_own_route_is_allowed_as_the_document_leaves_them(
    acme: Tenant, globex: Tenant, run_config: Run, tmp_path: Path
) -> None:
    """globex answers /a; acme's /a/b is longer, so acme may add /a/b/c, in the same document as /a/b or after it,
    but not in a document that removes /a/b (then globex's /a would answer /a/b/c today)."""
    services.api_create(tenant=acme, api_name="b", base_path="/a/b", upstream_url="https://b.example.com", actor=None)
    services.api_create(
        tenant=globex, api_name="a", base_path="/a", upstream_url="https://a.example.com", status="active", actor=None
    )

    code, _out, err = _apply(run_config, tmp_path, HEADER + "apis:\n" + _api("c", "/a/b/c"), "--prune")
    assert code == 1
    assert "apis[c].base_path: base_path '/a/b/c' overlaps another tenant's route; choose another." in err
    assert _acme_routes() == {"/a/b"}

    document = HEADER + "apis:\n" + _api("b", "/a/b") + _api("c", "/a/b/c")
    code, _out, err = _apply(run_config, tmp_path, document, "--prune")
    assert code == 2, err
    assert _acme_routes() == {"/a/b", "/a/b/c"}


def test_a_host_bound_route_over_another_tenants_hostless_route_is_refused(
    acme: Tenant, globex: Tenant, run_config: Run, tmp_path: Path
) -> None:
    services.api_create(
        tenant=globex, api_name="g", base_path="/shop/v1", upstream_url="https://g.example.com", actor=None
    )
    before = snapshot("acme", "globex")
    code, _out, err = _apply(run_config, tmp_path, HEADER + "apis:\n" + _api("s", "/shop", "shop.example.com"))
    assert code == 1
    assert err.endswith("apis[s].base_path: base_path '/shop' overlaps another tenant's route; choose another.\n")
    assert snapshot("acme", "globex") == before


def _queries_to_create(tenant: Tenant, apis: int) -> list[str]:
    text = HEADER + "policies:\n- {name: p, policy_type: rate_limiting, config: {requests_per_minute: 5}}\n"
    text += "plans:\n- {name: gold, policies: [p]}\napis:\n"
    text += "".join(
        f"- {{name: api-{i}, base_path: /{tenant.pk}/{i}, upstream_url: 'https://1.1.1.{i + 1}', policies: [p], plans: [gold],"
        f" targets: [{{url: 'https://1.1.2.{i + 1}'}}]}}\n"
        for i in range(apis)
    )
    document = config_doc.read_document(text, "size.yaml", {})
    with CaptureQueriesContext(connection) as queries:
        config_doc.apply_document(tenant=tenant, document=document, source="size.yaml", actor=None)
    return [q["sql"] for q in queries.captured_queries]


def test_each_api_created_costs_a_bounded_number_of_queries_and_one_audit_row(db: None) -> None:
    """The route check is one query for the whole document and the services take no savepoint per object."""
    small = services.tenant_create(id="small", name="Small", actor=None)
    large = services.tenant_create(id="large", name="Large", actor=None)
    few = _queries_to_create(small, 10)
    many = _queries_to_create(large, 40)
    # Per API: its row (and the checks of its fields: tenant, id, route), its links, its target, its audit row.
    assert (len(many) - len(few)) / 30 <= 8
    # The apply's own transaction (a savepoint here, inside the test's transaction) and no other.
    assert [q.split()[0] for q in many if "SAVEPOINT" in q] == ["SAVEPOINT", "RELEASE"]
    assert AuditEvent.objects.filter(tenant="large", action="api.create").count() == 40
