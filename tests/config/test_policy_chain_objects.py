"""The objects of the policy chain in configuration documents: policies of every type, JWT issuers by name, an API's
auth_method, jwt_issuers and validation, consumers' identities and IP lists; round trip, idempotence, precise
errors, prune refusals."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth.models import User

from apimgmt import config_doc, services
from apimgmt.models import Api, AuditEvent, Consumer, ConsumerIdentity, JwtIssuer, Policy, Tenant
from tests.config.conftest import build_world, snapshot

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwks(kid: str = "k1") -> dict[str, Any]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    return {"keys": [{"kty": "RSA", "kid": kid, "use": "sig", "n": _b64(numbers.n), "e": _b64(numbers.e)}]}


NEW_TYPES = {
    "browser": ("cors", {"allow_origins": ["https://app.example.com", "https://*.example.org"], "max_age": 60}),
    "office-only": ("ip_rules", {"allow": ["203.0.113.0/24", "2001:db8::/32"], "deny": ["203.0.113.7/32"]}),
    "stamp": (
        "headers",
        {"request": {"set": {"X-Consumer": "{consumer_id}"}, "remove": ["X-Debug"]}, "response": {"add": {"X-A": "1"}}},
    ),
    "small": ("request_limits", {"allowed_methods": ["GET", "POST"], "max_body_bytes": 65536}),
    "cached": ("response_cache", {"ttl_seconds": 60, "vary_headers": ["Accept-Language"]}),
}


USERS_SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "Users", "version": "1"},
    "paths": {
        "/users/{id}": {
            "get": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "The user."}},
            }
        }
    },
}


def build_chain_world(tenant: Tenant, *, actor: Any = None) -> dict[str, Any]:
    """build_world plus one policy of each new type, two issuers, a JWT API and consumers with identities."""
    world = build_world(tenant, actor=actor)
    policies = {
        name: services.policy_create(tenant=tenant, name=name, policy_type=kind, config=config, actor=actor)
        for name, (kind, config) in NEW_TYPES.items()
    }
    idp = services.jwt_issuer_create(
        tenant=tenant,
        name="idp",
        issuer="https://id.example.com/",
        audiences=["orders", "users"],
        public_keys=public_jwks(),
        algorithms=["RS256", "PS256"],
        leeway_seconds=10,
        consumer_claim="azp",
        actor=actor,
    )
    partner = services.jwt_issuer_create(
        tenant=tenant,
        name="partner",
        issuer="https://login.partner.example/",
        audiences=["https://api.acme.example"],
        jwks_url="https://1.2.3.4/.well-known/jwks.json",
        auto_provision=True,
        token_in_query="access_token",
        actor=actor,
    )
    services.plan_update(
        plan=world["plans"][0], actor=actor, policies=[*world["plans"][0].policies.all(), policies["office-only"]]
    )
    users = world["apis"][0]
    services.api_update(
        api=users,
        actor=actor,
        policies=[*users.policies.all(), *policies.values()],
        jwt_issuers=[idp, partner],
        auth_method="key_or_jwt",
        validation="shadow",
        openapi_spec=USERS_SPEC,
    )
    app = services.consumer_create(
        tenant=tenant, name="mobile", ip_allow=["198.51.100.0/24"], ip_deny=["198.51.100.9/32"], actor=actor
    )
    services.consumer_identity_create(consumer=app, issuer=idp, external_id="mobile-client", actor=actor)
    services.consumer_identity_create(consumer=app, issuer=partner, external_id="p-42", actor=actor)
    batch = services.consumer_create(tenant=tenant, name="batch", actor=actor)
    services.consumer_identity_create(consumer=batch, issuer=idp, external_id="batch-client", actor=actor)
    return {**world, "issuers": [idp, partner], "consumers": [app, batch]}


@pytest.fixture
def chain_world(acme: Tenant, alice: User) -> dict[str, Any]:
    return build_chain_world(acme, actor=alice)


def _export(run_config: Run, path: Path) -> str:
    code, _out, err = run_config("export", "--tenant", "acme", "--consumers", "-o", str(path))
    assert code == 0, err
    return path.read_text()


def _apply(run_config: Run, tmp_path: Path, text: str, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    return run_config("apply", "--tenant", "acme", "-f", str(path), *extra)


def test_round_trip_with_every_policy_type_issuers_identities_and_ip_lists(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    first = _export(run_config, tmp_path / "first.yaml")
    Tenant.objects.filter(pk="acme").delete()
    services.tenant_create(id="acme", name="Acme", actor=None)
    services.membership_set(
        tenant=Tenant.objects.get(pk="acme"), user=User.objects.get(username="alice"), role="admin", actor=None
    )

    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(tmp_path / "first.yaml"))

    assert (code, err) == (2, ""), out
    assert "+ jwt_issuer idp\n+ jwt_issuer partner\n" in out
    assert _export(run_config, tmp_path / "second.yaml") == first
    users = Api.objects.get(tenant="acme", api_name="users")
    assert (users.auth_method, users.validation) == ("key_or_jwt", "shadow")
    assert sorted(users.jwt_issuers.values_list("name", flat=True)) == ["idp", "partner"]
    assert {p.policy_type for p in users.policies.all()} >= {kind for kind, _config in NEW_TYPES.values()}
    mobile = Consumer.objects.get(tenant="acme", name="mobile")
    assert (mobile.ip_allow, mobile.ip_deny) == (["198.51.100.0/24"], ["198.51.100.9/32"])
    assert sorted(mobile.identities.values_list("issuer__name", "external_id")) == [
        ("idp", "mobile-client"),
        ("partner", "p-42"),
    ]
    partner = JwtIssuer.objects.get(tenant="acme", name="partner")
    assert (partner.jwks_url, partner.auto_provision, partner.token_in_query) == (
        "https://1.2.3.4/.well-known/jwks.json",
        True,
        "access_token",
    )


def test_the_export_names_everything_and_holds_public_keys_only(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    text = _export(run_config, tmp_path / "acme.yaml")
    document = config_doc.read_document(text, "acme.yaml", {})
    assert [i["name"] for i in document["jwt_issuers"]] == ["idp", "partner"]
    idp = document["jwt_issuers"][0]
    assert set(idp["public_keys"]["keys"][0]) == {"kty", "kid", "use", "n", "e"}  # no private member
    users = next(a for a in document["apis"] if a["name"] == "users")
    assert users["jwt_issuers"] == ["idp", "partner"]
    assert (users["auth_method"], users["validation"]) == ("key_or_jwt", "shadow")
    mobile = next(c for c in document["consumers"] if c["name"] == "mobile")
    assert mobile["identities"] == [
        {"issuer": "idp", "external_id": "mobile-client"},
        {"issuer": "partner", "external_id": "p-42"},
    ]
    for issuer in chain_world["issuers"]:
        assert issuer.pk not in text
    cors = next(p for p in document["policies"] if p["name"] == "browser")
    assert cors["config"]["allow_methods"] == ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]  # defaults written


def test_a_second_apply_changes_nothing_and_an_edit_is_planned_field_by_field(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    text = _export(run_config, tmp_path / "acme.yaml")
    audited = AuditEvent.objects.count()
    code, out, _err = _apply(run_config, tmp_path, text)
    assert code == 0 and "No changes" in out
    assert AuditEvent.objects.count() == audited

    edited = (
        text.replace("leeway_seconds: 10", "leeway_seconds: 20")
        .replace("validation: shadow", "validation: enforce")
        .replace("max_age: 60", "max_age: 120")
        .replace("  - 198.51.100.0/24\n", "  - 198.51.100.0/25\n")
    )
    code, out, err = _apply(run_config, tmp_path, edited)
    assert code == 2, err
    assert "~ jwt_issuer idp\n    leeway_seconds: 10 → 20\n" in out
    assert '    validation: "shadow" → "enforce"\n' in out
    assert "~ policy browser\n    config.max_age: 60 → 120\n" in out
    assert '    ip_allow: ["198.51.100.0/24"] → ["198.51.100.0/25"]\n' in out
    assert JwtIssuer.objects.get(tenant="acme", name="idp").leeway_seconds == 20
    assert Policy.objects.get(tenant="acme", name="browser").config["max_age"] == 120


def test_an_identity_moves_from_one_consumer_to_another_in_one_apply(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    text = _export(run_config, tmp_path / "acme.yaml")
    moved = text.replace("external_id: batch-client", "external_id: spare").replace(
        "external_id: mobile-client", "external_id: batch-client"
    )
    code, _out, err = _apply(run_config, tmp_path, moved)
    assert code == 2, err
    assert ConsumerIdentity.objects.get(issuer__tenant="acme", external_id="batch-client").consumer.name == "mobile"
    assert ConsumerIdentity.objects.get(issuer__tenant="acme", external_id="spare").consumer.name == "batch"


BAD = [
    pytest.param(
        ("  jwt_issuers:\n  - idp\n  - partner\n", "  jwt_issuers:\n  - idp\n  - nobody\n"),
        "apis[users].jwt_issuers: no JWT issuer named 'nobody' in this document.",
        id="unknown-issuer",
    ),
    pytest.param(
        ("issuer: https://id.example.com/", "issuer: id.example.com"),
        "jwt_issuers[idp].issuer: ",
        id="bad-issuer-setting",
    ),
    pytest.param(
        ("  - https://*.example.org\n", "  - https://app.example.com/path\n"),
        "policies[browser].config: allow_origins[1]: ",
        id="bad-cors-origin",
    ),
    pytest.param(
        ("    max_age: 60\n", "    max_agee: 60\n"),
        "policies[browser].config.max_agee: unknown field; did you mean `max_age`?",
        id="misspelt-config-field",
    ),
    pytest.param(
        ("  - issuer: partner\n    external_id: p-42\n", "  - issuer: partnr\n    external_id: p-42\n"),
        "consumers[mobile].identities[partnr:p-42].issuer: no JWT issuer named 'partnr' in this document.",
        id="identity-of-unknown-issuer",
    ),
    pytest.param(
        ("external_id: mobile-client", "external_id: batch-client"),
        "consumers[mobile].identities[idp:batch-client].external_id: consumer 'batch' has this external ID",
        id="one-external-id-two-consumers",
    ),
    pytest.param(
        ("  - 198.51.100.9/32\n", "  - 198.51.100.9/24\n"),
        "consumers[mobile].ip_deny: ",
        id="cidr-with-host-bits",
    ),
    pytest.param(
        ("  jwt_issuers:\n  - idp\n  - partner\n", "  jwt_issuers: []\n"),
        "apis[users].jwt_issuers: auth_method 'key_or_jwt' needs at least one JWT issuer (jwt_issuers).",
        id="jwt-without-issuers",
    ),
    pytest.param(
        ("validation: shadow", "validation: always"),
        "apis[users].validation: 'always' is not one of ['off', 'shadow', 'enforce']",
        id="validation-mode",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BAD)
def test_a_bad_new_object_is_named_and_nothing_changes(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    text = _export(run_config, tmp_path / "acme.yaml")
    assert edit[0] in text, edit[0]
    before = snapshot("acme")
    code, out, err = _apply(run_config, tmp_path, text.replace(edit[0], edit[1], 1), "--prune")
    assert (code, out) == (1, "")
    assert f"edited.yaml: {message}" in err
    assert snapshot("acme") == before


def test_prune_refuses_an_issuer_a_kept_api_accepts_and_deletes_an_unused_one(
    chain_world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    text = _export(run_config, tmp_path / "acme.yaml")
    document = config_doc.read_document(text, "acme.yaml", {})
    # Without the users API (active: its delete is refused) and without the issuers: both issuers stay refused.
    document["apis"] = [a for a in document["apis"] if a["name"] != "users"]
    document["jwt_issuers"] = []
    del document["consumers"]
    path = tmp_path / "pruned.json"
    path.write_text(config_doc.dump_text(document, "json"))
    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(path), "--prune")
    assert code == 1  # refusals: CI fails
    assert (
        "! delete jwt_issuer idp: refused: JWT issuer 'idp' stays accepted by API(s) 'users', whose deletion is "
        "refused; take it off their jwt_issuers first, then delete it." in out
    )
    # Keeping users but taking partner off it: partner goes, with its identities.
    document = config_doc.read_document(text, "acme.yaml", {})
    document["jwt_issuers"] = [i for i in document["jwt_issuers"] if i["name"] != "partner"]
    for api in document["apis"]:
        api["jwt_issuers"] = [n for n in api["jwt_issuers"] if n != "partner"]
    for consumer in document["consumers"]:
        consumer["identities"] = [i for i in consumer["identities"] if i["issuer"] != "partner"]
    path.write_text(config_doc.dump_text(document, "json"))
    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(path), "--prune")
    assert code == 2, err
    assert "- jwt_issuer partner" in out
    assert list(JwtIssuer.objects.filter(tenant="acme").values_list("name", flat=True)) == ["idp"]
    assert not ConsumerIdentity.objects.filter(external_id="p-42").exists()


def test_names_only_reach_the_documents_own_tenant(
    chain_world: dict[str, Any], globex: Tenant, run_config: Run, tmp_path: Path
) -> None:
    """globex has an issuer named idp too; acme's document naming idp never reaches it."""
    services.jwt_issuer_create(
        tenant=globex,
        name="idp",
        issuer="https://g.example.com/",
        audiences=["g"],
        public_keys=public_jwks(),
        actor=None,
    )
    before = snapshot("globex"), list(JwtIssuer.objects.filter(tenant="globex").values_list())
    text = _export(run_config, tmp_path / "acme.yaml").replace("leeway_seconds: 10", "leeway_seconds: 11")
    code, _out, err = _apply(run_config, tmp_path, text, "--prune")
    assert code == 2, err
    assert (snapshot("globex"), list(JwtIssuer.objects.filter(tenant="globex").values_list())) == before
    users = Api.objects.get(tenant="acme", api_name="users")
    assert {i.tenant_id for i in users.jwt_issuers.all()} == {"acme"}
