"""Bad documents get precise errors (file, object, field) and change nothing; one tenant's document never reaches
another tenant's objects, whatever names it uses; consumers and subscriptions when the document has them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from django.contrib.auth.models import User

from apimgmt import config_doc, services
from apimgmt.config_doc.document import API_FIELDS
from apimgmt.config_doc.schema import document_schema
from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, Plan, Policy, Subscription, Tenant
from tests.config.conftest import build_world, snapshot

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]
HEADER = "format: apimgmt/config/v1\n"
USERS = "- {name: users, base_path: /api/users/v1, upstream_url: 'https://users.example.com', status: active}\n"


def _apply(run_config: Run, tmp_path: Path, text: str, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "acme.yaml"
    path.write_text(text)
    return run_config("apply", "--tenant", "acme", "-f", str(path), *extra)


BAD_DOCUMENTS = [
    pytest.param(
        "apis:\n" + USERS,
        ["'format' is a required property"],
        id="no-format",
    ),
    pytest.param(
        HEADER + "apis:\n- {name: users, base_path: /u, upstream_url: 'https://u.example.com', colour: blue}\n",
        [
            f"apis[users].colour: unknown field; not one of the {len(API_FIELDS)} fields this object takes "
            "(docs/config.schema.json)."
        ],
        id="unknown-field",
    ),
    pytest.param(
        HEADER + "apis:\n- {name: users, base_path: /u, upstream_url: 'https://u.example.com', retries: two}\n",
        ["apis[users].retries: 'two' is not of type 'integer'"],
        id="wrong-type",
    ),
    pytest.param(
        HEADER + "policies:\n- {name: p, policy_type: quota, config: {requests_per_minute: 5}}\n",
        [
            "policies[p].config.requests_per_minute: unknown field; did you mean `requests_per_month`?",
            "policies[p].config: needs at least one of requests_per_day, requests_per_month.",
        ],
        id="policy-config-of-another-type",
    ),
    pytest.param(
        HEADER + "apis:\n- {name: users, base_path: /admin/x, upstream_url: 'ftp://u.example.com', policies: [nope]}\n",
        [
            "apis[users].base_path: base_path may not start with a reserved prefix "
            "(/admin, /health, /metrics, /mgmt, /portal, /ready, /static).",
            "apis[users].policies: no policy named 'nope' in this document.",
        ],
        id="bad-values-and-unknown-reference",
    ),
    pytest.param(
        HEADER + "apis:\n" + USERS + USERS.replace("/api/users/v1", "/api/users/v2"),
        ["apis[users]: two APIs are named 'users'; names must be unique."],
        id="duplicate-name",
    ),
    pytest.param(
        HEADER + "apis:\n" + USERS + USERS.replace("name: users", "name: people"),
        ["apis[users].base_path: API 'people' already uses this base path and host."],
        id="duplicate-route",
    ),
    pytest.param(
        HEADER + "apis:\n- name: users\n  name: people\n",
        ["line 4 column 3: not valid YAML: duplicate key 'name'"],
        id="duplicate-key",
    ),
    pytest.param(
        HEADER + "policies: &p\n- {name: a, policy_type: quota, config: {requests_per_day: 1}}\nplans: *p\n",
        [
            "line 2 column 11: not valid YAML: this value is used again through an alias (*name); aliases are not "
            "allowed, write it out"
        ],
        id="alias",
    ),
    pytest.param(
        HEADER + "apis:\n- {name: users\n",
        ["line 4 column 1: not valid YAML: did not find expected ',' or '}'"],
        id="syntax",
    ),
    pytest.param(
        HEADER + "apis:\n- {name: users, base_path: /u, upstream_url: '${UNSET_FOR_TEST}', description: 'a ${b'}\n",
        [
            "apis[users].description: '${' must start a variable such as ${UPSTREAM_URL}; write $${ for a literal.",
            "apis[users].upstream_url: variable ${UNSET_FOR_TEST} is not set.",
        ],
        id="variables",
    ),
]


BAD_DOCUMENTS += [
    pytest.param(
        HEADER
        + 'apis:\n- {name: "a\\0b", base_path: /u, upstream_url: "https://u.example.com", connect_timeout: .nan}\n',
        [
            "apis[a\x00b].name: text must not contain NUL characters.",
            "apis[a\x00b].connect_timeout: numbers must be finite (no NaN or infinity).",
        ],
        id="nul-and-nan",
    ),
    pytest.param(
        HEADER + "policies:\n- {name: p, policy_type: quota, config: {requests_per_day: .inf}}\n",
        ["policies[p].config.requests_per_day: numbers must be finite (no NaN or infinity)."],
        id="infinity",
    ),
]


MISSPELT = """format: apimgmt/config/v1
polices: []
policies:
- {name: p, policy_type: rate_limiting, config: {requests_per_minut: 5}, mod: shadow}
plans:
- {name: gold, polcies: [p]}
apis:
- name: users
  base_path: /u
  upstream_url: https://u.example.com
  retires: 2
  targets: [{url: 'https://x.example.com', wieght: 2}]
consumers:
- {name: app, descripton: x, subscriptions: [{api: users, plam: gold}]}
"""

BAD_DOCUMENTS += [
    pytest.param(
        MISSPELT,
        [
            "polices: unknown field; did you mean `policies`?",
            "policies[p].mod: unknown field; did you mean `mode`?",
            "policies[p].config.requests_per_minut: unknown field; did you mean `requests_per_minute`?",
            "policies[p].config: needs at least one of requests_per_second, requests_per_minute, requests_per_hour, "
            "requests_per_day.",
            "plans[gold].polcies: unknown field; did you mean `policies`?",
            "apis[users].retires: unknown field; did you mean `retries`?",
            "apis[users].targets[0].wieght: unknown field; did you mean `weight`?",
            "consumers[app].descripton: unknown field; did you mean `description`?",
            "consumers[app].subscriptions[users].plam: unknown field; did you mean `plan`?",
        ],
        id="misspelt-fields-everywhere",
    ),
]


@pytest.mark.parametrize(("text", "messages"), BAD_DOCUMENTS)
def test_a_bad_document_names_file_object_and_field_and_changes_nothing(
    world: dict[str, Any], run_config: Run, tmp_path: Path, text: str, messages: list[str]
) -> None:
    before = snapshot("acme")

    code, out, err = _apply(run_config, tmp_path, text, "--prune")

    assert (code, out) == (1, "")
    assert sorted(err.splitlines()) == sorted(f"{tmp_path / 'acme.yaml'}: {m}" for m in messages)
    assert snapshot("acme") == before


def test_a_service_refusal_halfway_through_rolls_back_everything_before_it(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    """The services refuse an upstream on a private address when they create the last API; the policy changed and
    the API created before it are undone (the apply takes no savepoints, so the whole transaction goes)."""
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    extra = (
        "- {name: aaa, base_path: /api/aaa, upstream_url: 'https://aaa.example.com'}\n"
        "- {name: zzz, base_path: /api/zzz, upstream_url: 'https://10.0.0.1'}\n"
    )
    text = path.read_text().replace("apis:\n", "apis:\n" + extra)
    text = text.replace("requests_per_minute: 100", "requests_per_minute: 5")
    before = snapshot("acme")

    code, _out, err = _apply(run_config, tmp_path, text)

    assert code == 1
    assert err.startswith(f"{path}: apis[zzz].upstream_url: ")
    assert snapshot("acme") == before


def test_a_route_another_tenant_answers_is_refused_before_anything_changes(
    world: dict[str, Any], globex: Tenant, run_config: Run, tmp_path: Path
) -> None:
    services.api_create(
        tenant=globex, api_name="shop", base_path="/shop", upstream_url="https://shop.example.com", actor=None
    )
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    extra = (
        "- {name: aaa, base_path: /api/aaa, upstream_url: 'https://aaa.example.com'}\n"
        "- {name: zzz, base_path: /shop/cart, upstream_url: 'https://zzz.example.com'}\n"
        "- {name: bound, base_path: /shop, host: shop.acme.example, upstream_url: 'https://b.example.com'}\n"
    )
    text = path.read_text().replace("apis:\n", "apis:\n" + extra)
    before = snapshot("acme", "globex")

    code, _out, err = _apply(run_config, tmp_path, text)

    assert code == 1
    assert sorted(err.splitlines()) == [
        f"{path}: apis[bound].base_path: base_path '/shop' overlaps another tenant's route; choose another.",
        f"{path}: apis[zzz].base_path: base_path '/shop/cart' overlaps another tenant's route; choose another.",
    ]
    assert snapshot("acme", "globex") == before


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        (
            ("policy_type: quota", "policy_type: rate_limiting", "requests_per_month", "requests_per_day"),
            "policies[monthly].policy_type: policy_type cannot be changed",
        ),
        (("status: active", "status: draft"), "apis[users].status: an API that is active cannot become draft."),
    ],
)
def test_changes_no_service_can_make_are_refused_in_the_plan(
    world: dict[str, Any], run_config: Run, tmp_path: Path, edits: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    text = path.read_text()
    for old, new in zip(edits[::2], edits[1::2], strict=True):
        text = text.replace(old, new)
    before = snapshot("acme")
    code, _out, err = _apply(run_config, tmp_path, text)
    assert code == 1
    assert f"{path}: {message}" in err
    assert snapshot("acme") == before


def test_every_export_is_valid_under_the_published_schema(world: dict[str, Any], bob_app: Consumer) -> None:
    acme = Tenant.objects.get(pk="acme")
    jsonschema.Draft202012Validator(document_schema()).validate(config_doc.export_document(acme, consumers=True))


def test_the_checked_in_schema_is_the_served_one() -> None:
    checked_in = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"
    assert checked_in.read_text() == config_doc.schema_text(), (
        "regenerate docs/config.schema.json (docs/config-as-code.md)"
    )


# ---------------------------------------------------------------------------
# Cross-tenant
# ---------------------------------------------------------------------------


def test_a_document_using_another_tenants_names_only_ever_touches_its_own_tenant(
    acme: Tenant, globex: Tenant, run_config: Run, tmp_path: Path
) -> None:
    build_world(globex, prefix="/globex")
    path = tmp_path / "globex.yaml"
    run_config("export", "--tenant", "globex", "-o", str(path))
    globex_text = path.read_text()
    before = snapshot("globex")
    # acme's document is globex's, names and all, with acme's own routes.
    acme_text = globex_text.replace("/globex/", "/acme/")

    code, _out, err = _apply(run_config, tmp_path, acme_text, "--prune")

    assert code == 2, err
    assert snapshot("globex") == before
    for model in (Policy, Plan, Api):
        acme_rows = set(model.objects.filter(tenant="acme").values_list("pk", flat=True))
        globex_rows = set(model.objects.filter(tenant="globex").values_list("pk", flat=True))
        assert len(acme_rows) == len(globex_rows) and not acme_rows & globex_rows
    for api in Api.objects.filter(tenant="acme").prefetch_related("policies", "plans"):
        assert {p.tenant_id for p in [*api.policies.all(), *api.plans.all()]} <= {"acme"}
    # Pruning acme down to nothing deletable leaves globex's same-named objects alone.
    code, _out, _err = _apply(run_config, tmp_path, HEADER + "apis: []\n", "--prune")
    assert code == 1  # acme's live APIs are refused …
    assert snapshot("globex") == before  # … and globex never entered the plan


def test_a_document_cannot_take_another_tenants_route_or_give_an_app_to_a_stranger(
    acme: Tenant, globex: Tenant, carol: User, run_config: Run, tmp_path: Path
) -> None:
    services.api_create(
        tenant=globex, api_name="users", base_path="/api/users/v1", upstream_url="https://g.example.com", actor=None
    )
    before = snapshot("acme", "globex")
    code, _out, err = _apply(run_config, tmp_path, HEADER + "apis:\n" + USERS)
    assert code == 1 and "apis[users]: Another API already uses this base path on this host." in err
    code, _out, err = _apply(run_config, tmp_path, HEADER + "consumers:\n- {name: app, owner: carol}\n")
    assert code == 1 and "consumers[carol/app].owner: The owner must be a member of this consumer's tenant." in err
    assert snapshot("acme", "globex") == before


# ---------------------------------------------------------------------------
# Consumers and subscriptions
# ---------------------------------------------------------------------------

CONSUMERS = """consumers:
- name: billing
  subscriptions:
  - {api: orders}
  - {api: users, plan: gold}
- name: mobile
  owner: bob
  description: The phone app
  subscriptions:
  - {api: users, plan: free, status: pending}
- {name: scraper, status: blocked}
"""


def test_consumers_and_subscriptions_are_applied_and_exported_without_keys(
    world: dict[str, Any], bob: User, run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    text = path.read_text() + CONSUMERS

    code, out, err = _apply(run_config, tmp_path, text)

    assert code == 2, err
    assert "+ consumer bob/mobile\n" in out and "+ subscription billing → orders\n" in out
    billing = Consumer.objects.get(name="billing", owner=None)
    # orders needs an admin's approval; the document says active, so the apply approves it.
    assert sorted(billing.subscriptions.values_list("api__api_name", "plan__name", "status")) == [
        ("orders", None, "active"),
        ("users", "gold", "active"),
    ]
    mobile = Consumer.objects.get(name="mobile", owner=bob)
    assert list(mobile.subscriptions.values_list("status", flat=True)) == ["pending"]
    assert Consumer.objects.get(name="scraper").status == "blocked"
    services.api_key_create(consumer=billing, actor=None)
    # Export, apply again: nothing to do; the key is nowhere in the document.
    exported = config_doc.dump_text(config_doc.export_document(Tenant.objects.get(pk="acme"), consumers=True))
    assert "- name: mobile\n  owner: bob\n  description: The phone app\n" in exported
    assert ApiKey.objects.get().key_prefix not in exported
    code, out, _err = _apply(run_config, tmp_path, exported)
    assert code == 0, out


def test_a_subscription_left_out_is_cancelled_only_with_prune_and_a_plan_change_moves_it(
    world: dict[str, Any], bob: User, run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    base = path.read_text()
    assert _apply(run_config, tmp_path, base + CONSUMERS)[0] == 2
    fewer = CONSUMERS.replace("  - {api: orders}\n", "").replace("plan: gold", "plan: free")

    code, out, _err = _apply(run_config, tmp_path, base + fewer)
    assert code == 2
    assert '~ subscription billing → users\n    plan: "gold" → "free"\n' in out
    assert "billing → orders" not in out

    code, out, _err = _apply(run_config, tmp_path, base + fewer, "--prune")
    assert code == 2
    assert "- subscription billing → orders\n" in out
    statuses = Subscription.objects.filter(consumer__name="billing").values_list(
        "api__api_name", "plan__name", "status"
    )
    # users moved from gold to free (change-plan: same subscription, same keys); orders cancelled by the prune.
    assert sorted(statuses) == [("orders", None, "cancelled"), ("users", "free", "active")]
    assert AuditEvent.objects.filter(action="subscription.change_plan").count() == 1


def test_without_a_consumers_section_consumers_are_left_alone_even_with_prune(
    world: dict[str, Any], bob_app: Consumer, run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    code, out, _err = _apply(run_config, tmp_path, path.read_text(), "--prune")
    assert code == 0, out
    assert Consumer.objects.filter(pk=bob_app.pk).exists()
    assert json.loads(
        config_doc.dump_text(config_doc.export_document(Tenant.objects.get(pk="acme")), "json")
    ).keys() == {
        "format",
        "policies",
        "jwt_issuers",
        "plans",
        "apis",
    }


def test_the_example_in_the_guide_is_a_valid_document() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "config-as-code.md").read_text()
    example = guide.split("```yaml\nformat: apimgmt/config/v1", 1)[1].split("```", 1)[0]
    document = config_doc.read_document(
        "format: apimgmt/config/v1" + example, "docs/config-as-code.md", {"USERS_UPSTREAM": "https://u.example.com"}
    )
    assert [a["name"] for a in document["apis"]] == ["orders", "users"]
    # "every field an API accepts is listed once": the raw example names each of them on one of its APIs.
    raw = yaml.safe_load("format: apimgmt/config/v1" + example.replace("${USERS_UPSTREAM}", "u"))
    named = [name for api in raw["apis"] for name in api]
    assert sorted(set(API_FIELDS) - set(named)) == []
    assert document["consumers"][1]["subscriptions"] == [{"api": "users", "plan": "free", "status": "pending"}]
    assert document["consumers"][1]["identities"] == [{"issuer": "idp", "external_id": "mobile-app"}]
    assert [p["policy_type"] for p in document["policies"]] == [
        "cors",
        "rate_limiting",
        "quota",
        "ip_rules",
        "rate_limiting",
    ]
