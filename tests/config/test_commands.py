"""``manage.py config export|diff|apply``: round trip, idempotence, plans people can read, CI exit codes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from apimgmt import services
from apimgmt.invalidation import EVICTIONS_STREAM, read_config_version
from apimgmt.models import Api, AuditEvent, Plan, Policy, Tenant
from tests.config.conftest import snapshot

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]


def _empty_tenant(tenant_id: str) -> Tenant:
    """The tenant wiped (it takes its APIs, plans and policies with it) and created again, empty."""
    Tenant.objects.filter(pk=tenant_id).delete()
    return services.tenant_create(id=tenant_id, name=tenant_id.title(), actor=None)


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_export_apply_to_an_empty_tenant_and_export_again_gives_identical_bytes(
    world: dict[str, Any], run_config: Run, tmp_path: Path, suffix: str
) -> None:
    first = tmp_path / f"acme.{suffix}"
    assert run_config("export", "--tenant", "acme", "-o", str(first))[0] == 0
    _empty_tenant("acme")

    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(first))

    assert (code, err) == (2, ""), out
    assert "8 to create, 0 to update, 0 to delete" in out
    second = tmp_path / f"again.{suffix}"
    assert run_config("export", "--tenant", "acme", "-o", str(second))[0] == 0
    assert second.read_bytes() == first.read_bytes()
    orders = Api.objects.get(tenant="acme", api_name="orders")
    assert (orders.status, orders.sunset_at.isoformat(), orders.key_query_param) == (
        "deprecated",
        "2027-06-01T00:00:00+00:00",
        "apikey",
    )
    users = Api.objects.get(tenant="acme", api_name="users")
    assert users.description == "Users and their ${placeholders}"  # a literal ${ survives the round trip
    assert sorted(users.targets.values_list("url", "weight")) == [
        ("https://users-2.example.com", 3),
        ("https://users-3.example.com", 1),
    ]


def test_export_is_readable_yaml_keyed_by_name_without_ids_or_secrets(
    world: dict[str, Any], bob_key: Any, run_config: Run
) -> None:
    code, out, _err = run_config("export", "--tenant", "acme", "--consumers")
    assert code == 0
    assert out.startswith("format: apimgmt/config/v1\npolicies:\n- name: burst\n")
    assert "description: |-\n    Spikes,\n    measured before they are enforced.\n" in out
    assert "  policies:\n  - burst\n  - standard\n" in out
    ids = [obj.pk for kind in ("policies", "plans", "apis") for obj in world[kind]]
    for secret_or_id in (*ids, bob_key[0].consumer_id, bob_key[0].pk, bob_key[1], bob_key[0].key_hash, "ak_"):
        assert secret_or_id not in out
    assert "- name: bob-app\n  owner: bob\n" in out


def test_a_second_apply_changes_nothing_and_writes_no_audit_rows(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    text = path.read_text().replace("requests_per_minute: 100", "requests_per_minute: 250")
    text = text.replace("upstream_url: http://beta.example.com", "upstream_url: http://beta-2.example.com")
    path.write_text(text)

    code, out, _err = run_config("apply", "--tenant", "acme", "-f", str(path))
    assert code == 2
    assert "~ policy standard\n    config.requests_per_minute: 100 → 250\n" in out
    assert '    upstream_url: "http://beta.example.com" → "http://beta-2.example.com"' in out
    audited = AuditEvent.objects.count()
    before = snapshot("acme")

    code, out, _err = run_config("apply", "--tenant", "acme", "-f", str(path))

    assert code == 0
    assert "0 to create, 0 to update, 0 to delete" in out and "No changes" in out
    assert AuditEvent.objects.count() == audited
    assert snapshot("acme") == before
    assert run_config("diff", "--tenant", "acme", "-f", str(path))[0] == 0


def test_diff_lists_creates_updates_old_to_new_and_deletes_and_changes_nothing(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text(
        """format: apimgmt/config/v1
policies:
- name: standard
  policy_type: rate_limiting
  config: {requests_per_minute: 100}
- name: strict
  policy_type: quota
  config: {requests_per_day: 50}
plans:
- name: gold
  policies: [standard, strict]
apis:
- name: users
  base_path: /api/users/v1
  upstream_url: https://users.example.com
  status: active
  policies: [standard]
  plans: [gold]
"""
    )
    before = snapshot("acme")

    code, out, err = run_config("diff", "--tenant", "acme", "-f", str(path), "--prune")

    assert (code, err) == (1, "")  # apply would be refused: CI fails on the pull request already
    assert snapshot("acme") == before
    lines = out.splitlines()
    assert lines[0] == (f"Plan for tenant acme from {path}: 1 to create, 2 to update, 4 to delete, 1 refused.")
    assert "+ policy strict" in lines
    assert '    policies: ["monthly", "standard"] → ["standard", "strict"]' in lines  # plan gold
    assert '    plans: ["free", "gold"] → ["gold"]' in lines  # API users
    assert "- api beta" in lines and "- plan free" in lines
    refused = [line for line in lines if line.startswith("!")]
    assert len(refused) == 1
    assert refused[0].startswith("! delete api orders: refused: API 'orders' is deprecated")
    assert "- policy burst" in lines  # users no longer uses it after this plan
    assert lines[-1].startswith("fingerprint: sha256:")


def test_apply_with_refused_deletes_reports_them_and_changes_nothing(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text("format: apimgmt/config/v1\n")
    before = snapshot("acme")

    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(path), "--prune")

    assert code == 1
    assert "! delete api users: refused: API 'users' is active" in out
    assert "! delete plan gold" not in out  # its only API is refused, but no subscription holds the plan
    assert "! delete policy standard: refused: Policy 'standard' stays attached to API 'users'" in out
    assert "nothing applied: 4 delete(s) would be refused" in err
    assert snapshot("acme") == before


def test_prune_deletes_what_the_file_leaves_out_and_a_plan_in_use_is_refused(
    world: dict[str, Any], bob_app: Any, bob: User, run_config: Run, tmp_path: Path
) -> None:
    users = world["apis"][0]
    gold = world["plans"][0]
    services.subscription_request(consumer=bob_app, api=users, plan=gold, actor=bob)
    services.api_retire(api=users, actor=None)
    services.api_retire(api=world["apis"][1], actor=None)
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    # Keep only the draft API and the policies; gold is held by bob's (now cancelled) subscription to users…
    text = path.read_text()
    path.write_text(
        text[: text.index("plans:")] + "apis:\n" + text[text.index("- name: beta") : text.index("- name: orders")]
    )

    code, out, err = run_config("diff", "--tenant", "acme", "-f", str(path), "--prune")
    # …which goes with the API, so nothing is refused.
    assert code == 2, out + err
    assert "- api orders\n- api users\n- plan free\n- plan gold\n" in out
    code, out, _err = run_config("apply", "--tenant", "acme", "-f", str(path), "--prune")
    assert code == 2
    assert sorted(Api.objects.filter(tenant="acme").values_list("api_name", flat=True)) == ["beta"]
    assert not Plan.objects.filter(tenant="acme").exists()
    assert Policy.objects.filter(tenant="acme").count() == 3


def test_a_renamed_api_takes_over_its_old_route_with_prune(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    path.write_text(path.read_text().replace("name: beta\n", "name: beta-2\n"))
    assert run_config("apply", "--tenant", "acme", "-f", str(path))[0] == 1  # beta still holds /api/beta

    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(path), "--prune")

    assert code == 2, err
    assert "+ api beta-2\n- api beta\n" in out
    assert Api.objects.get(base_path="/api/beta").api_name == "beta-2"


def test_archiving_a_plan_in_the_file_archives_it_and_the_round_trip_keeps_it(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    text = path.read_text()
    assert "- name: free\n  description: Try it\n  approval: manual\n  archived: false\n" in text
    path.write_text(text.replace("approval: manual\n  archived: false", "approval: manual\n  archived: true"))

    code, out, _err = run_config("apply", "--tenant", "acme", "-f", str(path))

    assert code == 2
    assert "~ plan free\n    archived: false → true\n" in out
    assert Plan.objects.get(name="free").archived_at is not None
    again = tmp_path / "again.yaml"
    run_config("export", "--tenant", "acme", "-o", str(again))
    assert again.read_bytes() == path.read_bytes()
    assert run_config("apply", "--tenant", "acme", "-f", str(path))[0] == 0


def test_without_prune_objects_the_file_does_not_mention_are_left_alone(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text(
        "format: apimgmt/config/v1\npolicies:\n- {name: extra, policy_type: quota, config: {requests_per_day: 5}}\n"
    )
    code, out, _err = run_config("apply", "--tenant", "acme", "-f", str(path))
    assert code == 2
    assert "1 to create, 0 to update, 0 to delete (without --prune nothing is deleted)" in out
    assert Api.objects.filter(tenant="acme").count() == 3
    assert Policy.objects.filter(tenant="acme").count() == 4


@pytest.mark.django_db(transaction=True)
def test_apply_tells_the_gateways_once_and_audits_each_change_with_the_actor(
    acme: Tenant, alice: User, redis_client: Any, run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    apis = "".join(
        f"- {{name: api-{i}, base_path: /api/n{i}, upstream_url: 'https://n{i}.example.com', status: active,"
        f" policies: [standard]}}\n"
        for i in range(20)
    )
    path.write_text(
        "format: apimgmt/config/v1\npolicies:\n- {name: standard, policy_type: rate_limiting,"
        " config: {requests_per_minute: 10}}\napis:\n" + apis
    )
    version = read_config_version()
    audited = AuditEvent.objects.count()

    code, _out, _err = run_config("apply", "--tenant", "acme", "-f", str(path), "--actor", "alice")

    assert code == 2
    assert read_config_version() == version + 1
    events = AuditEvent.objects.order_by("id")[audited:]
    assert [e.action for e in events] == ["policy.create"] + ["api.create"] * 20
    assert {e.actor_repr for e in events} == {"alice"}


def test_dry_run_checks_everything_then_leaves_no_trace(
    world: dict[str, Any], redis_client: Any, run_config: Run, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    path.write_text(path.read_text().replace("name: beta\n", "name: beta-2\n").replace("/api/beta", "/api/beta-2"))
    before, version = snapshot("acme"), read_config_version()

    code, out, err = run_config("apply", "--tenant", "acme", "-f", str(path), "--dry-run")

    assert code == 2, err
    assert "+ api beta-2" in out and "rolled back (dry run)" in out
    assert snapshot("acme") == before and read_config_version() == version


def test_environment_variables_fill_in_values_and_a_missing_one_is_named(
    acme: Tenant, run_config: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text(
        "format: apimgmt/config/v1\napis:\n- name: users\n  base_path: /api/users\n  upstream_url: ${USERS_UPSTREAM}\n"
    )
    monkeypatch.delenv("USERS_UPSTREAM", raising=False)
    code, _out, err = run_config("apply", "--tenant", "acme", "-f", str(path))
    assert code == 1
    assert err.strip() == f"{path}: apis[users].upstream_url: variable ${{USERS_UPSTREAM}} is not set."
    assert not Api.objects.exists()

    monkeypatch.setenv("USERS_UPSTREAM", "https://users.prod.example.com")
    assert run_config("apply", "--tenant", "acme", "-f", str(path))[0] == 2
    assert Api.objects.get().upstream_url == "https://users.prod.example.com"


def test_a_plan_made_before_an_admin_edit_is_refused(world: dict[str, Any], run_config: Run, tmp_path: Path) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    path.write_text(path.read_text().replace("requests_per_minute: 100", "requests_per_minute: 200"))
    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(path))
    fingerprint = out.splitlines()[-1].removeprefix("fingerprint: ")
    # Meanwhile, in the admin:
    services.api_update(api=world["apis"][2], description="edited by hand", actor=None)
    before = snapshot("acme")

    code, _out, err = run_config("apply", "--tenant", "acme", "-f", str(path), "--fingerprint", fingerprint)

    assert code == 1
    assert "changed since the plan was made" in err
    assert snapshot("acme") == before
    # Planned again, the edit shows (it would be undone) and the new fingerprint is accepted.
    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(path))
    assert '    description: "edited by hand" → ""' in out
    fingerprint = out.splitlines()[-1].removeprefix("fingerprint: ")
    assert run_config("apply", "--tenant", "acme", "-f", str(path), "--fingerprint", fingerprint)[0] == 2


def test_unknown_tenant_and_unreadable_file_are_errors(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    assert run_config("export", "--tenant", "nope") == (1, "", "No tenant 'nope'.\n")
    code, _out, err = run_config("diff", "--tenant", "acme", "-f", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml: cannot read" in err


@pytest.mark.django_db(transaction=True)
def test_blocking_many_consumers_evicts_their_keys_in_one_message(
    acme: Tenant, redis_client: Any, run_config: Run, tmp_path: Path
) -> None:
    hashes = []
    for name in ("a", "b", "c"):
        consumer = services.consumer_create(tenant=acme, name=name, actor=None)
        hashes.append(services.api_key_create(consumer=consumer, actor=None)[0].key_hash)
    length = redis_client.xlen(EVICTIONS_STREAM)
    path = tmp_path / "acme.yaml"
    path.write_text(
        "format: apimgmt/config/v1\nconsumers:\n"
        + "".join(f"- {{name: {name}, status: blocked}}\n" for name in ("a", "b", "c"))
    )

    assert run_config("apply", "--tenant", "acme", "-f", str(path))[0] == 2

    assert redis_client.xlen(EVICTIONS_STREAM) == length + 1
    ((_id, fields),) = redis_client.xrevrange(EVICTIONS_STREAM, count=1)
    assert sorted(fields[b"keys"].decode().split(",")) == sorted(hashes)


@pytest.mark.django_db(transaction=True)
def test_an_apply_waits_for_an_admin_edit_in_progress_then_refuses_the_stale_plan(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    from django.db import connection, transaction

    from apimgmt import config_doc

    acme = Tenant.objects.get(pk="acme")
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    document = config_doc.read_document(path.read_text(), str(path), {})
    fingerprint = config_doc.plan_for(acme, document, source=str(path)).fingerprint
    locked, go = threading.Event(), threading.Event()

    def admin_edit() -> None:
        try:
            with transaction.atomic():
                api = Api.objects.select_for_update().get(tenant="acme", api_name="beta")
                locked.set()
                go.wait(10)
                services.api_update(api=api, description="edited in the admin", actor=None)
        finally:
            connection.close()

    def apply() -> Any:
        try:
            return config_doc.apply_document(
                tenant=acme, document=document, source=str(path), actor=None, expected_fingerprint=fingerprint
            )
        except config_doc.StalePlan as exc:
            return exc
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        editing = pool.submit(admin_edit)
        assert locked.wait(10)
        applying = pool.submit(apply)
        time.sleep(0.5)
        assert not applying.done()  # waiting for the row the admin holds
        go.set()
        editing.result(10)
        outcome = applying.result(10)

    assert isinstance(outcome, config_doc.StalePlan)
    assert Api.objects.get(tenant="acme", api_name="beta").description == "edited in the admin"


def test_two_apis_of_one_name_cannot_be_keyed_and_are_named(acme: Tenant, run_config: Run, tmp_path: Path) -> None:
    for base_path in ("/a", "/b"):
        services.api_create(
            tenant=acme, api_name="twin", base_path=base_path, upstream_url="https://t.example.com", actor=None
        )
    code, out, err = run_config("export", "--tenant", "acme")
    assert (code, out) == (1, "")
    assert err == "<stdout>: apis[twin]: the tenant has more than one API named 'twin'; rename one first.\n"
    path = tmp_path / "acme.yaml"
    path.write_text("format: apimgmt/config/v1\n")
    assert run_config("diff", "--tenant", "acme", "-f", str(path))[0] == 1


def test_diff_as_json_for_machines(world: dict[str, Any], run_config: Run, tmp_path: Path) -> None:
    path = tmp_path / "acme.yaml"
    run_config("export", "--tenant", "acme", "-o", str(path))
    path.write_text(path.read_text().replace("requests_per_minute: 100", "requests_per_minute: 150"))

    code, out, _err = run_config("diff", "--tenant", "acme", "-f", str(path), "--json")

    assert code == 2
    plan = json.loads(out)
    assert plan["summary"] == {"create": 0, "update": 1, "delete": 0, "refused": 0}
    (change,) = plan["changes"]
    assert (change["kind"], change["name"]) == ("policy", "standard")
    assert change["fields"]["config"]["old"]["requests_per_minute"] == 100
    assert change["fields"]["config"]["new"]["requests_per_minute"] == 150
