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

from apimgmt import services
from apimgmt.models import Api, AuditEvent, JwtIssuer, Tenant
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
    assert "note: security scheme 'oauth' is declared but no security requirement uses it: not mapped." in out
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
    spec["security"] = [{"key": []}]
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
        " not used (servers[0] is the upstream).\nnote: security scheme 'oauth' is declared but no security "
        "requirement uses it: not mapped.\n",
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


# Security schemes: JWT schemes map to auth_method jwt / key_or_jwt with the tenant's matching issuers.

OIDC = {"type": "openIdConnect", "openIdConnectUrl": "https://id.example.com/.well-known/openid-configuration"}
OAUTH = {
    "type": "oauth2",
    "flows": {"clientCredentials": {"tokenUrl": "https://login.partner.example/oauth/token", "scopes": {}}},
}
API_KEY = {"type": "apiKey", "in": "header", "name": "X-Pets-Key"}
BEARER_JWT = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}


def _issuer(tenant: Tenant, name: str, issuer: str) -> JwtIssuer:
    return services.jwt_issuer_create(
        tenant=tenant, name=name, issuer=issuer, audiences=["pets"], jwks_url="https://1.2.3.4/jwks", actor=None
    )


def _secured(schemes: dict[str, Any], security: list[dict[str, Any]] | None) -> dict[str, Any]:
    spec = large_spec("3.1.0", resources=1)
    spec["components"]["securitySchemes"] = schemes
    if security is None:
        del spec["security"]
    else:
        spec["security"] = security
    return spec


def _import(run_config: Run, tmp_path: Path, spec: dict[str, Any]) -> tuple[int, str, Api]:
    code, out, err = run_config("import-openapi", str(_write(tmp_path, spec)), "--tenant", "acme")
    assert code in (0, 2), out + err
    return code, out, Api.objects.get(tenant="acme")


@pytest.mark.parametrize(
    ("schemes", "security", "method", "issuers", "key_header"),
    [
        pytest.param({"oidc": OIDC}, [{"oidc": []}], "jwt", ["idp"], "X-API-Key", id="openIdConnect-by-issuer"),
        pytest.param(
            {"key": API_KEY, "oidc": OIDC},
            [{"key": []}, {"oidc": []}],
            "key_or_jwt",
            ["idp"],
            "X-Pets-Key",
            id="api-key-or-openIdConnect",
        ),
        pytest.param(
            {"key": API_KEY, "oidc": OIDC, "oauth": OAUTH},
            [{"oidc": []}],
            "jwt",
            ["idp"],
            "X-API-Key",
            id="only-the-required-scheme",
        ),
        pytest.param(
            {"key": API_KEY, "oidc": OIDC}, None, "key_or_jwt", ["idp"], "X-Pets-Key", id="no-requirement-all"
        ),
    ],
)
def test_jwt_security_schemes_map_to_the_auth_method_and_matching_issuers(
    acme: Tenant,
    globex: Tenant,
    run_config: Run,
    tmp_path: Path,
    schemes: dict[str, Any],
    security: list[dict[str, Any]] | None,
    method: str,
    issuers: list[str],
    key_header: str,
) -> None:
    _issuer(acme, "idp", "https://id.example.com/")
    _issuer(acme, "partner", "https://login.partner.example/")
    _issuer(acme, "elsewhere", "https://other.example.net/")
    _issuer(globex, "idp", "https://id.example.com/")  # another tenant's issuer is never attached

    code, out, api = _import(run_config, tmp_path, _secured(schemes, security))

    assert code == 2
    assert (api.auth_method, api.key_header) == (method, key_header)
    assert [i.name for i in api.jwt_issuers.all()] == issuers
    assert {i.tenant_id for i in api.jwt_issuers.all()} == {"acme"}
    assert f"→ auth_method {method}, JWT issuer(s) {', '.join(issuers)}." in out
    assert run_config("import-openapi", str(tmp_path / "spec.yaml"), "--tenant", "acme")[0] == 0  # idempotent


def test_a_jwt_scheme_without_a_matching_issuer_is_a_note_and_keys_stay(
    acme: Tenant, run_config: Run, tmp_path: Path
) -> None:
    _issuer(acme, "elsewhere", "https://other.example.net/")
    spec = _secured({"key": API_KEY, "jwt": BEARER_JWT, "oidc": OIDC}, [{"key": []}, {"jwt": [], "oidc": []}])

    code, out, api = _import(run_config, tmp_path, spec)

    assert code == 2
    assert (api.auth_method, api.key_header, list(api.jwt_issuers.all())) == ("key", "X-Pets-Key", [])
    assert (
        "note: security scheme(s) 'jwt' (issuer (a bearer JWT scheme names none)), 'oidc' (issuer "
        "https://id.example.com) call for auth_method key_or_jwt, but no JWT issuer of the tenant matches: add the "
        "issuer, attach it to the API (jwt_issuers) and set auth_method key_or_jwt before publishing; until then the "
        "API takes API keys only."
    ) in out
    assert "no equivalent" not in out


# Issuers of one identity provider host: each of the tenant's directories (staff, partners) is an issuer of its own.
STAFF = "https://login.microsoftonline.com/8f3e1c2a-0000-4000-8000-000000000001/v2.0"
PARTNERS = "https://login.microsoftonline.com/8f3e1c2a-0000-4000-8000-000000000002/v2.0"
POOL = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123"


def _oidc(issuer: str) -> dict[str, Any]:
    return {"type": "openIdConnect", "openIdConnectUrl": issuer + "/.well-known/openid-configuration"}


@pytest.mark.parametrize(
    ("discovery_issuer", "attached"),
    [
        pytest.param(STAFF, ["staff"], id="exact"),
        pytest.param(
            STAFF.replace("login.microsoftonline.com", "LOGIN.MicrosoftOnline.com:443") + "/",
            ["staff"],
            id="normalised",
        ),
        pytest.param(STAFF[:-1] + "9/v2.0", [], id="another-directory-on-the-host"),
        pytest.param("https://login.microsoftonline.com", [], id="the-host-alone"),
        pytest.param(POOL.lower(), [], id="a-pool-id-differing-in-case"),
        pytest.param("https://accounts.google.com", ["google"], id="google"),
    ],
)
def test_an_openid_connect_scheme_attaches_only_the_issuer_it_names_never_others_on_its_host(
    acme: Tenant, run_config: Run, tmp_path: Path, discovery_issuer: str, attached: list[str]
) -> None:
    _issuer(acme, "staff", STAFF)
    _issuer(acme, "partners", PARTNERS)
    _issuer(acme, "pool", POOL)
    _issuer(acme, "google", "https://accounts.google.com")

    _code, out, api = _import(run_config, tmp_path, _secured({"oidc": _oidc(discovery_issuer)}, [{"oidc": []}]))

    assert [i.name for i in api.jwt_issuers.all()] == attached
    assert api.auth_method == ("jwt" if attached else "key")
    if not attached:
        assert "no JWT issuer of the tenant matches" in out


def test_an_oauth2_scheme_attaches_no_issuer_even_on_its_issuers_host(
    acme: Tenant, run_config: Run, tmp_path: Path
) -> None:
    _issuer(acme, "staff", STAFF)
    _issuer(acme, "partners", PARTNERS)
    _issuer(acme, "partner", "https://login.partner.example/")
    oauth = {
        "type": "oauth2",
        "flows": {
            "authorizationCode": {
                "authorizationUrl": STAFF.removesuffix("/v2.0") + "/oauth2/v2.0/authorize",
                "tokenUrl": STAFF.removesuffix("/v2.0") + "/oauth2/v2.0/token",
                "scopes": {},
            }
        },
    }

    code, out, api = _import(
        run_config, tmp_path, _secured({"oauth": oauth, "partner": OAUTH}, [{"oauth": [], "partner": []}])
    )

    assert code == 2
    assert (api.auth_method, list(api.jwt_issuers.all())) == ("key", [])
    assert (
        "note: security scheme(s) 'oauth' (an oauth2 scheme names no issuer: attach the one its tokens carry in iss), "
        "'partner' (an oauth2 scheme names no issuer: attach the one its tokens carry in iss) call for auth_method "
        "jwt, but no JWT issuer of the tenant matches: add the issuer, attach it to the API (jwt_issuers) and set "
        "auth_method jwt before publishing; until then the API takes API keys only."
    ) in out

    # Beside an OpenID Connect scheme that names its issuer: that issuer only, and a note for the oauth2 scheme.
    spec = _secured({"oauth": oauth, "oidc": _oidc(STAFF)}, [{"oauth": []}, {"oidc": []}])
    code, out, api = _import(run_config, tmp_path, spec)
    assert (api.auth_method, [i.name for i in api.jwt_issuers.all()]) == ("jwt", ["staff"])
    assert (
        "note: security scheme(s) 'oauth' (an oauth2 scheme names no issuer: attach the one its tokens carry in iss): "
        "no JWT issuer of the tenant is attached for them; add the issuer and attach it to the API (jwt_issuers) if "
        "their tokens must be accepted too."
    ) in out


def test_a_bearer_jwt_scheme_keeps_the_issuers_the_api_already_accepts(
    acme: Tenant, run_config: Run, tmp_path: Path
) -> None:
    idp = _issuer(acme, "idp", "https://id.example.com/")
    spec = _secured({"jwt": BEARER_JWT}, [{"jwt": []}])
    _code, _out, api = _import(run_config, tmp_path, spec)
    assert api.auth_method == "key"
    services.api_update(api=api, actor=None, jwt_issuers=[idp])

    code, out, api = _import(run_config, tmp_path, spec)

    assert code == 2
    assert (api.auth_method, [i.name for i in api.jwt_issuers.all()]) == ("jwt", ["idp"])
    assert "with the JWT issuer(s) the API already accepts" in out


def test_unmapped_and_anonymous_requirements_are_reported(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    spec = _secured(
        {"basic": {"type": "http", "scheme": "basic"}, "cookie": {"type": "apiKey", "in": "cookie", "name": "sid"}},
        [{"basic": []}, {"cookie": []}, {}, {"missing": []}],
    )

    _code, out, api = _import(run_config, tmp_path, spec)

    assert api.auth_method == "key"
    notes = [line for line in out.splitlines() if line.startswith("note: ") and "servers[" not in line]
    assert notes == [
        "note: the spec's security allows calls without credentials ({}); the gateway still requires one.",
        "note: security requirement 'missing' names no scheme in components.securitySchemes: not mapped.",
        "note: security scheme 'basic' (http basic) has no equivalent at the gateway, which checks API keys and "
        "JWTs: not mapped.",
        "note: security scheme 'cookie' (apiKey in cookie) has no equivalent at the gateway, which checks API keys "
        "and JWTs: not mapped.",
    ]
