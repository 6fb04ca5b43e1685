"""Configuration documents follow the plan rule: a subscription to an API that offers plans names one of them.

No plan, or a plan the API does not offer, is refused with the subscription's path in the document, and nothing of
the tenant changes (the services refuse it the same way: apimgmt/services.py, subscription_request)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apimgmt.models import Api, Consumer, Subscription
from tests.config.conftest import snapshot

pytestmark = pytest.mark.django_db

Run = Callable[..., tuple[int, str, str]]

# The world's users API offers gold and free; silver is a plan of the tenant it does not offer.
SILVER = "- name: silver\n  approval: auto\n"


def _exported(run_config: Run, tmp_path: Path) -> str:
    path = tmp_path / "export.yaml"
    code, _out, err = run_config("export", "--tenant", "acme", "-o", str(path))
    assert code == 0, err
    return path.read_text()


def _apply(run_config: Run, tmp_path: Path, text: str) -> tuple[int, str, str, Path]:
    path = tmp_path / "acme.yaml"
    path.write_text(text)
    return (*run_config("apply", "--tenant", "acme", "-f", str(path)), path)


def _document(run_config: Run, tmp_path: Path, subscription: str, plans_extra: str) -> str:
    """The tenant's export with one more consumer, billing, subscribed as ``subscription`` (and ``plans_extra``)."""
    text = _exported(run_config, tmp_path)
    assert "\nplans:\n" in text
    text = text.replace("\nplans:\n", "\nplans:\n" + plans_extra, 1)
    return text + f"consumers:\n- name: billing\n  subscriptions:\n  - {subscription}\n"


REFUSED = [
    pytest.param("{api: users}", "", "API 'users' is offered on plans free, gold: choose one of them.", id="no-plan"),
    pytest.param(
        "{api: users, plan: silver}",
        SILVER,
        "Plan 'silver' is not offered for API 'users'; choose one of: free, gold.",
        id="plan-not-offered",
    ),
]


@pytest.mark.parametrize(("subscription", "plans_extra", "message"), REFUSED)
def test_a_subscription_without_one_of_the_apis_plans_is_refused_and_changes_nothing(
    world: dict[str, Any], run_config: Run, tmp_path: Path, subscription: str, plans_extra: str, message: str
) -> None:
    users = Api.objects.get(tenant="acme", api_name="users")
    assert sorted(users.plans.values_list("name", flat=True)) == ["free", "gold"]
    text = _document(run_config, tmp_path, subscription, plans_extra)
    before = snapshot("acme")

    code, out, err, path = _apply(run_config, tmp_path, text)

    assert (code, out) == (1, ""), err
    # The file, the subscription (its consumer and API) and the field; the message names the plans on offer.
    assert re.fullmatch(rf"{re.escape(str(path))}: consumers\[billing.*users\]\.plan: {re.escape(message)}\n", err), err
    assert snapshot("acme") == before
    assert not Consumer.objects.filter(tenant="acme", name="billing").exists()
    assert not Subscription.objects.filter(api=users).exists()


@pytest.mark.parametrize(("subscription", "plans_extra", "message"), REFUSED)
def test_the_refusal_names_the_subscriptions_path_in_the_document(
    world: dict[str, Any], run_config: Run, tmp_path: Path, subscription: str, plans_extra: str, message: str
) -> None:
    code, _out, err, path = _apply(run_config, tmp_path, _document(run_config, tmp_path, subscription, plans_extra))
    assert code == 1
    assert err == f"{path}: consumers[billing].subscriptions[users].plan: {message}\n"


def test_a_subscription_on_one_of_the_apis_plans_is_applied(
    world: dict[str, Any], run_config: Run, tmp_path: Path
) -> None:
    """The same document with a plan the API offers: the refusal above is the rule, not a broken document."""
    text = (
        _exported(run_config, tmp_path)
        + "consumers:\n- name: billing\n  subscriptions:\n  - {api: users, plan: gold}\n"
    )

    code, out, err, _path = _apply(run_config, tmp_path, text)

    assert code == 2, (out, err)  # applied, with changes
    assert list(Subscription.objects.filter(consumer__name="billing").values_list("plan__name", flat=True)) == ["gold"]
