"""Importing APIs from OpenAPI 3.0/3.1 documents: large real-world-shaped specs map to an API; broken ones are
refused with the place that is wrong, and nothing is created."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile

from apimgmt.models import Api, AuditEvent, Tenant
from tests.config.conftest import snapshot
from tests.config.specs import large_spec

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]
IMPORT = "/mgmt/v1/apis/import/"


def _write(tmp_path: Path, spec: Any, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec) if name.endswith(".json") else yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_large_openapi_3_0_yaml_spec_becomes_a_draft_api(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    spec = large_spec("3.0.3")
    path = _write(tmp_path, spec)

    code, out, err = run_config("import-openapi", str(path), "--tenant", "acme")

    assert (code, err) == (2, ""), out
    api = Api.objects.get(tenant="acme")
    assert out.splitlines()[0] == (
        "Created API 'Pet Store' (draft) at /pet-store → https://eu.pets.example.com/v2: 300 operations in its spec."
    )
    assert "note: servers[1] https://sandbox.pets.example.com/v2 not used (servers[0] is the upstream)." in out
    assert "note: security scheme 'oauth' (oauth2) has no equivalent at the gateway" in out
    assert (api.api_name, api.status, api.base_path, api.upstream_url) == (
        "Pet Store",
        "draft",
        "/pet-store",
        "https://eu.pets.example.com/v2",
    )
    assert (api.key_header, api.key_query_param, api.accept_bearer) == ("X-Pets-Key", "", True)
    assert api.description == "Version 2.4.0.\n\nPets, cats and dogs."
    assert api.openapi_spec == spec  # kept whole, $refs and all, for the portal


def test_a_3_1_json_spec_with_the_base_path_and_upstream_given(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    spec = large_spec("3.1.0")
    spec["components"]["securitySchemes"] = {"key": {"type": "apiKey", "in": "query", "name": "api_key"}}
    path = _write(tmp_path, spec, "spec.json")

    code, out, _err = run_config(
        "import-openapi",
        str(path),
        "--tenant",
        "acme",
        "--base-path",
        "/pets/v2",
        "--upstream",
        "https://pets.internal.example.com",
    )

    assert code == 2, out
    api = Api.objects.get(tenant="acme")
    assert (api.base_path, api.upstream_url) == ("/pets/v2", "https://pets.internal.example.com")
    assert (api.key_query_param, api.accept_bearer) == ("api_key", False)


def test_importing_again_updates_the_api_of_the_same_title_and_only_what_changed(
    acme: Tenant, run_config: Run, tmp_path: Path
) -> None:
    spec = large_spec("3.0.3", resources=5)
    path = _write(tmp_path, spec)
    assert run_config("import-openapi", str(path), "--tenant", "acme", "--base-path", "/pets")[0] == 2
    audited = AuditEvent.objects.count()

    assert run_config("import-openapi", str(path), "--tenant", "acme")[:2] == (
        0,
        "API 'Pet Store' already matches the spec; nothing changed.\nnote: servers[1] https://sandbox.pets.example.com/v2"
        " not used (servers[0] is the upstream).\nnote: security scheme 'oauth' (oauth2) has no equivalent at the "
        "gateway, which checks API keys: not mapped.\n",
    )
    assert AuditEvent.objects.count() == audited

    spec["info"]["version"] = "2.5.0"
    del spec["paths"]["/res4/mine"]
    _write(tmp_path, spec)
    code, out, _err = run_config("import-openapi", str(path), "--tenant", "acme")
    assert code == 2
    assert out.splitlines()[0] == "Updated API 'Pet Store': description, openapi_spec."
    api = Api.objects.get(tenant="acme")
    assert api.base_path == "/pets" and api.description.startswith("Version 2.5.0.")
    assert "/res4/mine" not in api.openapi_spec["paths"]
    assert AuditEvent.objects.filter(action="api.update").count() == 1


def _broken(change: Callable[[dict[str, Any]], Any]) -> str:
    spec = large_spec("3.0.3", resources=3)
    change(spec)
    return yaml.safe_dump(spec)


def _dangling(spec: dict[str, Any]) -> None:
    schema = {"$ref": "#/components/schemas/Missing"}
    spec["paths"]["/res0"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = schema


def _pet_is(ref: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec["components"]["schemas"].update(Pet={"$ref": ref})


def _servers(url: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.update(servers=[{"url": url}])


BROKEN = [
    pytest.param(
        "openapi: 3.0.3\ninfo: {title: x\n",
        ["line 3 column 1: not valid YAML: did not find expected ',' or '}'"],
        id="yaml",
    ),
    pytest.param(
        yaml.safe_dump({"swagger": "2.0", "info": {"title": "x", "version": "1"}, "paths": {}}),
        ["/swagger: Swagger 2.0 is not supported; convert it to OpenAPI 3 first."],
        id="swagger-2",
    ),
    pytest.param(
        _broken(lambda spec: spec["info"].pop("title")), ["/info: 'title' is a required property"], id="no-title"
    ),
    pytest.param(
        _broken(lambda spec: spec["paths"].update(pets={"get": {"responses": {}}})),
        ["/paths: 'pets' does not match any of the regexes: '^\\\\/', '^x-'"],
        id="path-without-slash",
    ),
    pytest.param(
        _broken(_dangling),
        [
            "/paths/~1res0/get/responses/200/content/application~1json/schema/$ref: "
            "$ref '#/components/schemas/Missing' does not resolve to anything in the document."
        ],
        id="dangling-ref",
    ),
    pytest.param(
        _broken(_pet_is("pets.yaml#/Pet")),
        [
            "/components/schemas/Pet/$ref: $ref 'pets.yaml#/Pet' points outside the document; bundle the spec into "
            "one file first."
        ],
        id="external-ref",
    ),
    pytest.param(
        _broken(_servers("/v2")),
        ["/servers/0/url: server URL '/v2' is not an absolute http(s) URL; give the upstream URL."],
        id="relative-server",
    ),
    pytest.param(
        _broken(_servers("http://10.0.0.8/v2")),
        [
            "upstream_url: upstream_url host '10.0.0.8' is a loopback, private, link-local or metadata address; set "
            "UPSTREAM_ALLOW_PRIVATE=true to allow internal upstreams."
        ],
        id="private-upstream",
    ),
]


@pytest.mark.parametrize(("text", "messages"), BROKEN)
def test_a_broken_spec_is_refused_naming_the_place_and_nothing_is_created(
    acme: Tenant, run_config: Run, tmp_path: Path, settings: Any, text: str, messages: list[str]
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = False
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    before = snapshot("acme")

    code, out, err = run_config("import-openapi", str(path), "--tenant", "acme")

    assert (code, out) == (1, "")
    assert err.splitlines() == [f"{path}: {m}" for m in messages]
    assert snapshot("acme") == before


# ---------------------------------------------------------------------------
# POST /mgmt/v1/apis/import/
# ---------------------------------------------------------------------------


def test_import_over_the_api_as_json_or_multipart(acme: Tenant, alice: User, client_for: Callable[[User], Any]) -> None:
    client = client_for(alice)
    spec = large_spec("3.1.0", resources=10)

    r = client.post(IMPORT, {"tenant_id": "acme", "spec": spec, "base_path": "/pets"}, format="json")

    assert r.status_code == 201, r.content
    body = r.json()
    assert (body["created"], body["operations"], body["api"]["api_name"], body["api"]["base_path"]) == (
        True,
        50,
        "Pet Store",
        "/pets",
    )
    assert AuditEvent.objects.get(action="api.create").actor == alice
    spec["info"]["version"] = "3.0.0"
    upload = SimpleUploadedFile("pets.yaml", yaml.safe_dump(spec).encode(), content_type="application/yaml")
    r = client.post(IMPORT, {"tenant_id": "acme", "file": upload}, format="multipart")
    assert r.status_code == 200, r.content
    assert r.json()["created"] is False and r.json()["api"]["description"].startswith("Version 3.0.0.")
    assert Api.objects.count() == 1


@pytest.mark.parametrize(("who", "status"), [("bob", 403), ("vera", 403), ("carol", 400), ("root", 201)])
def test_import_needs_the_role_that_creates_apis(
    acme: Tenant,
    bob: User,
    vera: User,
    carol: User,
    staff: User,
    client_for: Callable[[User], Any],
    who: str,
    status: int,
) -> None:
    r = client_for(User.objects.get(username=who)).post(
        IMPORT, {"tenant_id": "acme", "spec": large_spec(resources=1)}, format="json"
    )
    assert r.status_code == status, r.content
    assert Api.objects.filter(tenant="acme").exists() == (status == 201)
    if who == "carol":  # another tenant's admin learns nothing about acme
        assert r.json()["errors"] == {"tenant_id": ["Unknown tenant 'acme'."]}


def test_a_broken_spec_over_the_api_is_a_400_keyed_by_json_pointer(
    acme: Tenant, alice: User, client_for: Callable[[User], Any]
) -> None:
    client = client_for(alice)
    before = snapshot("acme")
    spec = yaml.safe_load(_broken(_pet_is("#/components/schemas/Nope")))
    r = client.post(IMPORT, {"tenant_id": "acme", "spec": spec}, format="json")
    assert r.status_code == 400
    assert r["Content-Type"] == "application/problem+json"
    assert r.json()["errors"] == {
        "/components/schemas/Pet/$ref": [
            "$ref '#/components/schemas/Nope' does not resolve to anything in the document."
        ]
    }
    r = client.post(IMPORT, {"tenant_id": "acme", "spec": spec, "spec_text": "x"}, format="json")
    assert r.status_code == 400 and "once" in r.json()["errors"]["spec"][0]
    assert snapshot("acme") == before


def test_restrict_to_spec_is_set_by_the_import_and_left_alone_unless_given(
    acme: Tenant, run_config: Run, tmp_path: Path
) -> None:
    path = _write(tmp_path, large_spec(resources=2))
    assert run_config("import-openapi", str(path), "--tenant", "acme", "--restrict-to-spec")[0] == 2
    assert Api.objects.get().restrict_to_spec is True
    assert run_config("import-openapi", str(path), "--tenant", "acme")[0] == 0
    assert Api.objects.get().restrict_to_spec is True
    code, out, _err = run_config("import-openapi", str(path), "--tenant", "acme", "--no-restrict-to-spec")
    assert code == 2 and out.startswith("Updated API 'Pet Store': restrict_to_spec.")
    assert Api.objects.get().restrict_to_spec is False
