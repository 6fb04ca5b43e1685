"""Secrets never leave in an export: a policy value set from ``${VARIABLE}`` is exported as that reference while
the stored value still matches (as a generated ``${…}`` with a warning once it changed), any other secret-shaped
header value as a generated ``${…}`` with a warning, and export → apply (variables set) → export keeps the bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.models import AuditEvent, Policy, Tenant

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]
TOKEN = "s3cr3t-upstream-token-4f9a"
COOKIE = "session=abc123def456"
DOCUMENT = """format: apimgmt/config/v1
policies:
- name: upstream-auth
  policy_type: headers
  config:
    request:
      set:
        X-Upstream-Token: ${UPSTREAM_TOKEN}
        X-Trace: t-${TRACE_PREFIX}-$${{x}}
        X-Plain: visible
"""


def _apply(run_config: Run, path: Path, *args: str) -> tuple[int, str, str]:
    return run_config("apply", "--tenant", "acme", "-f", str(path), *args)


def _export(run_config: Run, path: Path) -> tuple[str, str]:
    code, _out, err = run_config("export", "--tenant", "acme", "-o", str(path))
    assert code == 0, err
    return path.read_text(), err


@pytest.fixture
def variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_TOKEN", TOKEN)
    monkeypatch.setenv("TRACE_PREFIX", "acme")


def test_a_value_from_a_variable_is_exported_as_the_variable(
    acme: Tenant, run_config: Run, tmp_path: Path, variables: None
) -> None:
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    assert _apply(run_config, source)[0] == 2
    policy = Policy.objects.get(tenant=acme, name="upstream-auth")
    assert policy.config["request"]["set"]["X-Upstream-Token"] == TOKEN  # the gateway gets the value

    first, warnings = _export(run_config, tmp_path / "export.yaml")

    assert TOKEN not in first and warnings == ""
    assert "X-Upstream-Token: ${UPSTREAM_TOKEN}" in first
    assert "X-Trace: t-${TRACE_PREFIX}-$${{x}}" in first  # the document's text, escapes and all
    assert "X-Plain: visible" in first
    assert TOKEN not in str(policy.config_references)  # an HMAC of it, not the secret

    audited = AuditEvent.objects.count()
    code, out, _err = _apply(run_config, tmp_path / "export.yaml")
    assert code == 0, out  # nothing to change, nothing written
    assert AuditEvent.objects.count() == audited
    assert _export(run_config, tmp_path / "again.yaml")[0] == first


def test_export_apply_to_an_empty_tenant_and_export_again_keeps_the_bytes(
    acme: Tenant, run_config: Run, tmp_path: Path, variables: None
) -> None:
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    assert _apply(run_config, source)[0] == 2
    first, _warnings = _export(run_config, tmp_path / "first.yaml")
    Tenant.objects.filter(pk="acme").delete()
    services.tenant_create(id="acme", name="Acme", actor=None)

    assert _apply(run_config, tmp_path / "first.yaml")[0] == 2

    assert _export(run_config, tmp_path / "second.yaml")[0] == first


def test_a_secret_shaped_header_without_a_reference_is_exported_as_a_placeholder(
    acme: Tenant, run_config: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.policy_create(
        tenant=acme,
        name="signer",
        policy_type="headers",
        config={
            "request": {"set": {"X-Service-Key": TOKEN, "Cookie": COOKIE, "X-Plain": "visible"}},
            "response": {"add": {"X-Session-Token": TOKEN}},
        },
        actor=None,
    )

    first, warnings = _export(run_config, tmp_path / "export.yaml")

    assert TOKEN not in first and COOKIE not in first
    assert "Cookie: ${SIGNER_COOKIE}" in first
    assert "X-Service-Key: ${SIGNER_X_SERVICE_KEY}" in first
    assert "X-Session-Token: ${SIGNER_X_SESSION_TOKEN}" in first
    assert "X-Plain: visible" in first
    assert warnings.splitlines() == [
        "warning: policies[signer].config.request.set.Cookie is written as ${SIGNER_COOKIE}, not in clear: set "
        "SIGNER_COOKIE when applying this file.",
        "warning: policies[signer].config.request.set.X-Service-Key is written as ${SIGNER_X_SERVICE_KEY}, not in "
        "clear: set SIGNER_X_SERVICE_KEY when applying this file.",
        "warning: policies[signer].config.response.add.X-Session-Token is written as ${SIGNER_X_SESSION_TOKEN}, not "
        "in clear: set SIGNER_X_SESSION_TOKEN when applying this file.",
    ]

    # Applied with the variables set, the values are unchanged and the placeholders become references.
    monkeypatch.setenv("SIGNER_COOKIE", COOKIE)
    monkeypatch.setenv("SIGNER_X_SERVICE_KEY", TOKEN)
    monkeypatch.setenv("SIGNER_X_SESSION_TOKEN", TOKEN)
    audited = AuditEvent.objects.count()
    assert _apply(run_config, tmp_path / "export.yaml")[0] == 0
    assert AuditEvent.objects.count() == audited
    again, warnings = _export(run_config, tmp_path / "again.yaml")
    assert (again, warnings) == (first, "")


def test_a_value_changed_elsewhere_is_no_longer_its_reference(
    acme: Tenant, run_config: Run, tmp_path: Path, variables: None
) -> None:
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    assert _apply(run_config, source)[0] == 2
    policy = Policy.objects.get(tenant=acme, name="upstream-auth")
    config = {"request": {"set": {"X-Upstream-Token": "rotated-in-the-admin", "X-Trace": "t-${{other}}"}}}

    services.policy_update(policy=policy, actor=None, config=config)
    text, warnings = _export(run_config, tmp_path / "export.yaml")

    assert "rotated-in-the-admin" not in text and "other" not in text
    # Both were taken from variables: placeholders with warnings, whether or not the header's name looks secret.
    assert "X-Upstream-Token: ${UPSTREAM_AUTH_X_UPSTREAM_TOKEN}" in text
    assert "X-Trace: ${UPSTREAM_AUTH_X_TRACE}" in text
    assert "UPSTREAM_AUTH_X_UPSTREAM_TOKEN" in warnings and "UPSTREAM_AUTH_X_TRACE" in warnings


def test_a_dry_run_records_nothing_and_a_literal_clears_the_reference(
    acme: Tenant, run_config: Run, tmp_path: Path, variables: None
) -> None:
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    assert _apply(run_config, source, "--dry-run")[0] == 2
    assert not Policy.objects.filter(tenant=acme).exists()
    assert _apply(run_config, source)[0] == 2
    assert set(Policy.objects.get(tenant=acme).config_references) == {
        "/request/set/X-Trace",
        "/request/set/X-Upstream-Token",
    }

    source.write_text(DOCUMENT.replace("${UPSTREAM_TOKEN}", TOKEN))  # the same value, now written in the file
    assert _apply(run_config, source)[0] == 0  # the configuration is the same
    assert set(Policy.objects.get(tenant=acme).config_references) == {"/request/set/X-Trace"}


def test_the_management_api_export_has_no_secret(acme: Tenant, alice: User, client_for: Callable[[User], Any]) -> None:
    services.policy_create(
        tenant=acme,
        name="signer",
        policy_type="headers",
        config={"request": {"set": {"X-Service-Key": TOKEN}}},
        actor=None,
    )

    r = client_for(alice).get("/mgmt/v1/tenants/acme/config/?output=yaml")

    assert r.status_code == 200
    body = r.content.decode()
    assert TOKEN not in body and "${SIGNER_X_SERVICE_KEY}" in body


def test_a_plan_never_shows_a_secret_header_value(
    acme: Tenant, run_config: Run, tmp_path: Path, variables: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "acme.yaml"
    source.write_text(DOCUMENT)
    assert _apply(run_config, source)[0] == 2
    monkeypatch.setenv("UPSTREAM_TOKEN", "the-next-token-77")
    monkeypatch.setenv("TRACE_PREFIX", "globex")

    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(source))
    json_code, json_out, _err = run_config("diff", "--tenant", "acme", "-f", str(source), "--json")

    assert (code, json_code) == (2, 2)
    for shown in (out, json_out):
        assert TOKEN not in shown and "the-next-token-77" not in shown
        assert "t-acme-" not in shown and "t-globex-" not in shown  # from a variable too: hidden, whatever its name
        assert '"X-Plain": "visible"' in shown  # other values as they are
    assert '"X-Upstream-Token": "(secret)"' in out and '"X-Upstream-Token": "(secret, changed)"' in out
    fields = json.loads(json_out)["changes"][0]["fields"]["config"]
    for header in ("X-Upstream-Token", "X-Trace"):
        assert fields["old"]["request"]["set"][header] == "(secret)"
        assert fields["new"]["request"]["set"][header] == "(secret, changed)"
    assert _apply(run_config, source)[0] == 2  # what is applied is the value, not the mask
    assert Policy.objects.get(tenant=acme).config["request"]["set"]["X-Upstream-Token"] == "the-next-token-77"
