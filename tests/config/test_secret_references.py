"""A value a document takes from ``${VARIABLE}`` is a secret whatever its header is called: plans hide it (text,
JSON, the management API, apply's output) and export never writes it in clear, even after it changed outside the
file or SECRET_KEY changed. A header value of templates only is no secret; the management API's export returns its
warnings in a ``Warning`` header."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.test import override_settings

from apimgmt import config_doc, services
from apimgmt.api.config_views import warning_header
from apimgmt.models import AuditEvent, Policy, Tenant

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]
CONFIG = "/mgmt/v1/tenants/acme/config/"
OLD = "old-s3cr3t-value-111"
NEW = "new-s3cr3t-value-222"
# X-Upstream-Auth does not look secret by its name (no token, key, secret…): only the reference says it is.
DOCUMENT = """format: apimgmt/config/v1
policies:
- name: upstream-auth
  policy_type: headers
  config:
    request:
      set:
        X-Upstream-Auth: ${UPSTREAM_AUTH}
        X-Plain: visible
"""
PLACEHOLDER_WARNING = (
    "warning: policies[upstream-auth].config.request.set.X-Upstream-Auth was applied from ${UPSTREAM_AUTH} and its "
    "value changed outside the file since (in the admin or the API, or SECRET_KEY changed): it is written as "
    "${UPSTREAM_AUTH_X_UPSTREAM_AUTH}, not in clear: set UPSTREAM_AUTH_X_UPSTREAM_AUTH when applying this file, or "
    "write the old reference back once its variable holds the current value."
)


@pytest.fixture
def applied(acme: Tenant, run_config: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DOCUMENT applied with UPSTREAM_AUTH=OLD; the file's path."""
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    monkeypatch.setenv("UPSTREAM_AUTH", OLD)
    assert run_config("apply", "--tenant", "acme", "-f", str(source))[0] == 2
    return source


def _export(run_config: Run) -> tuple[str, str]:
    code, out, err = run_config("export", "--tenant", "acme")
    assert code == 0, err
    return out, err


def test_a_plan_hides_a_value_from_a_variable_whatever_the_header_is_called(
    acme: Tenant,
    alice: User,
    client_for: Callable[[User], Any],
    run_config: Run,
    applied: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UPSTREAM_AUTH", NEW)  # CI: the secret was rotated in the vault

    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(applied))
    json_code, json_out, _err = run_config("diff", "--tenant", "acme", "-f", str(applied), "--json")
    plan = config_doc.plan_document(acme, DOCUMENT, source="acme.yaml", variables={"UPSTREAM_AUTH": NEW})
    r = client_for(alice).post(CONFIG + "plan/", {"text": DOCUMENT, "variables": {"UPSTREAM_AUTH": NEW}}, format="json")
    apply_code, apply_out, _err = run_config("apply", "--tenant", "acme", "-f", str(applied))

    assert (code, json_code, r.status_code, apply_code) == (2, 2, 200, 2)
    for shown in (out, json_out, json.dumps(plan.as_json()), r.content.decode(), apply_out):
        assert OLD not in shown and NEW not in shown
    for text in (out, apply_out):
        assert (
            '    config.request: {"add": {}, "remove": [], "set": {"X-Plain": "visible", "X-Upstream-Auth": "(secret)"}}'
            ' → {"add": {}, "remove": [], "set": {"X-Plain": "visible", "X-Upstream-Auth": "(secret, changed)"}}\n'
        ) in text
    for body in (json.loads(json_out), r.json()):
        fields = body["changes"][0]["fields"]["config"]
        assert fields["old"]["request"]["set"] == {"X-Upstream-Auth": "(secret)", "X-Plain": "visible"}
        assert fields["new"]["request"]["set"] == {"X-Upstream-Auth": "(secret, changed)", "X-Plain": "visible"}
    # What is applied is the value, not the mask.
    assert Policy.objects.get(tenant=acme).config["request"]["set"]["X-Upstream-Auth"] == NEW


def test_a_plan_hides_a_value_the_stored_policy_took_from_a_variable(
    acme: Tenant, run_config: Run, applied: Path
) -> None:
    """The document now writes the value in the file; the old one came from a variable at the last apply."""
    applied.write_text(DOCUMENT.replace("${UPSTREAM_AUTH}", "now-in-the-file"))

    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(applied), "--json")

    assert code == 2 and OLD not in out
    fields = json.loads(out)["changes"][0]["fields"]["config"]
    assert fields["old"]["request"]["set"]["X-Upstream-Auth"] == "(secret)"
    assert fields["new"]["request"]["set"]["X-Upstream-Auth"] == "(secret, changed)"


def test_a_value_from_a_variable_changed_in_the_admin_is_exported_as_a_placeholder_with_a_warning(
    acme: Tenant, alice: User, run_config: Run, applied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err = _export(run_config)
    assert "X-Upstream-Auth: ${UPSTREAM_AUTH}" in out and OLD not in out and err == ""
    policy = Policy.objects.get(tenant=acme, name="upstream-auth")
    services.policy_update(policy=policy, actor=alice, config={"request": {"set": {"X-Upstream-Auth": NEW}}})

    out, err = _export(run_config)

    assert NEW not in out and OLD not in out
    assert "X-Upstream-Auth: ${UPSTREAM_AUTH_X_UPSTREAM_AUTH}" in out
    assert err.splitlines() == [PLACEHOLDER_WARNING]

    # Applied with the new variable set, nothing changes and the placeholder becomes the reference.
    exported = tmp_path / "export.yaml"
    exported.write_text(out)
    monkeypatch.setenv("UPSTREAM_AUTH_X_UPSTREAM_AUTH", NEW)
    audited = AuditEvent.objects.count()
    assert run_config("apply", "--tenant", "acme", "-f", str(exported))[0] == 0
    assert AuditEvent.objects.count() == audited
    assert _export(run_config) == (out, "")


def test_after_a_secret_key_rotation_a_reference_is_a_placeholder_unless_the_old_key_is_a_fallback(
    run_config: Run, applied: Path
) -> None:
    old_key = settings.SECRET_KEY
    with override_settings(SECRET_KEY="a-rotated-secret-key-" + "x" * 40):
        out, err = _export(run_config)
        assert OLD not in out and "X-Upstream-Auth: ${UPSTREAM_AUTH_X_UPSTREAM_AUTH}" in out
        assert err.splitlines() == [PLACEHOLDER_WARNING]
    with override_settings(SECRET_KEY="a-rotated-secret-key-" + "x" * 40, SECRET_KEY_FALLBACKS=[old_key]):
        out, err = _export(run_config)
        assert "X-Upstream-Auth: ${UPSTREAM_AUTH}" in out and err == ""


def test_a_header_value_of_templates_only_is_no_secret(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    templates = {
        "X-Cache-Key": "{api_id}:{consumer_id}",
        "X-Idempotency-Key": "{request_id}",
        "X-User-Token": "Bearer {jwt.sub}",
    }
    services.policy_create(
        tenant=acme,
        name="ids",
        policy_type="headers",
        config={"request": {"set": {**templates, "X-Service-Key": "k-{consumer_id}-9f8e7d"}}},
        actor=None,
    )

    out, err = _export(run_config)

    for header, value in templates.items():
        assert f"{header}: {value}" in out or f"{header}: '{value}'" in out
    assert "X-Service-Key: ${IDS_X_SERVICE_KEY}" in out and "9f8e7d" not in out  # a literal beside the template
    assert [line.split(" is written")[0] for line in err.splitlines()] == [
        "warning: policies[ids].config.request.set.X-Service-Key"
    ]

    document = yaml.safe_load(out)
    document["policies"][0]["config"]["request"]["set"]["X-Cache-Key"] = "{consumer_id}"
    source = tmp_path / "ids.yaml"
    source.write_text(config_doc.dump_text(document, "yaml").replace("${IDS_X_SERVICE_KEY}", "k-{consumer_id}-9f8e7d"))
    code, plan, _err = run_config("diff", "--tenant", "acme", "-f", str(source))
    assert code == 2
    assert '"X-Cache-Key": "{api_id}:{consumer_id}"' in plan and '"X-Cache-Key": "{consumer_id}"' in plan


def test_the_management_api_export_returns_its_warnings_in_a_warning_header(
    acme: Tenant, alice: User, client_for: Callable[[User], Any]
) -> None:
    client = client_for(alice)
    assert "Warning" not in client.get(CONFIG + "?output=yaml")  # nothing written as a placeholder
    services.policy_create(
        tenant=acme,
        name="signer",
        policy_type="headers",
        config={"request": {"set": {"X-Service-Key": OLD}}},
        actor=None,
    )

    for output in ("yaml", "json"):
        r = client.get(CONFIG + f"?output={output}")
        assert r.status_code == 200 and OLD not in r.content.decode()
        assert r["Warning"] == (
            '299 apimgmt "policies[signer].config.request.set.X-Service-Key is written as ${SIGNER_X_SERVICE_KEY}, '
            'not in clear: set SIGNER_X_SERVICE_KEY when applying this file."'
        )
        # The body is still the document, ready to post back.
        assert yaml.safe_load(r.content)["policies"][0]["name"] == "signer"


def test_warning_header_quotes_each_warning() -> None:
    assert warning_header(['a "b" c:\\d', "é, f"]) == '299 apimgmt "a \\"b\\" c:\\\\d", 299 apimgmt "\\\\xe9, f"'


def test_warning_header_writes_control_characters_escaped_and_stays_short() -> None:
    # A policy's name may hold a newline or a vertical tab: no header may (Django refuses one, gunicorn the other).
    assert warning_header(["a\nb\x0bc"]) == '299 apimgmt "a\\x0ab\\x0bc"'
    many = warning_header(
        [f"policies[p{i:02}].config.request.set.X-Service-Key is written as ${{P}}" * 2 for i in range(60)]
    )
    assert len(many) <= 2000  # what proxies take for a whole answer's headers is 4 KiB by default
    assert many.endswith('more: manage.py config export prints every warning"')


def test_an_export_with_many_placeholders_and_odd_names_still_answers(
    acme: Tenant, alice: User, client_for: Callable[[User], Any]
) -> None:
    for i in range(30):
        services.policy_create(
            tenant=acme,
            name=f"signer\n{i:02}",
            policy_type="headers",
            config={"request": {"set": {"X-Service-Key": OLD}}},
            actor=None,
        )
    r = client_for(alice).get(CONFIG + "?output=yaml")
    assert r.status_code == 200 and OLD not in r.content.decode()
    assert "\n" not in r["Warning"] and len(r["Warning"]) <= 2000
    assert len(yaml.safe_load(r.content)["policies"]) == 30
