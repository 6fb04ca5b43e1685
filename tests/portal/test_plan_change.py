"""Upgrade and downgrade in the portal: a subscription's other plans on offer, a move at once to a plan that takes
subscriptions automatically, a request awaiting approval for one that does not, keys untouched."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apimgmt import services
from apimgmt.models import Api, Consumer, Event, Plan, Subscription, Tenant


@pytest.fixture
def plans(acme: Tenant, acme_api: Api, alice: User) -> dict[str, Plan]:
    quota = services.policy_create(
        tenant=acme, name="daily", policy_type="quota", config={"requests_per_day": 10000}, actor=alice
    )
    found = {
        "free": services.plan_create(tenant=acme, name="Free", actor=alice),
        "silver": services.plan_create(tenant=acme, name="Silver", policies=[quota], actor=alice),
        "gold": services.plan_create(tenant=acme, name="Gold", approval="manual", actor=alice),
        "old": services.plan_create(tenant=acme, name="Legacy", actor=alice),
    }
    services.api_update(api=acme_api, plans=list(found.values()), actor=alice)
    services.plan_archive(plan=found["old"], actor=alice)
    return found


@pytest.fixture
def on_free(bob_app: Consumer, acme_api: Api, plans: dict[str, Plan], bob: User) -> Subscription:
    return services.subscription_request(consumer=bob_app, api=acme_api, plan=plans["free"], actor=bob)


def _client(user: User) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def _token(page: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert match
    return match.group(1)


def _plan_url(sub: Subscription) -> str:
    return f"/portal/acme/apps/{sub.consumer_id}/subscriptions/{sub.pk}/plan/"


def test_the_app_page_links_to_the_plan_page_which_offers_the_apis_other_plans(bob, bob_app, on_free, plans):
    client = _client(bob)
    app_page = client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    assert _plan_url(on_free) in app_page and "Change plan" in app_page
    page = client.get(_plan_url(on_free)).content.decode()
    assert re.search(r'data-testid="current-plan">Free<', page)
    offered = re.findall(r'name="plan" value="([^"]+)"', page)
    assert sorted(offered) == sorted([plans["silver"].pk, plans["gold"].pk])  # not Free (current), not Legacy
    assert "Silver: 10,000 requests per day" in page and "Gold: No request limits (needs approval)" in page


def test_moving_to_an_automatic_plan_happens_at_once_and_keeps_the_keys(bob, bob_app, bob_key, on_free, plans):
    client = _client(bob)
    url = _plan_url(on_free)
    token = _token(client.get(url).content.decode())
    answer = client.post(url, {"plan": plans["silver"].pk, "csrfmiddlewaretoken": token}, follow=True)
    assert answer.redirect_chain == [(f"/portal/acme/apps/{bob_app.pk}/", 302)]
    assert "bob-app is on the Silver plan for users now" in answer.content.decode()
    on_free.refresh_from_db()
    assert on_free.plan_id == plans["silver"].pk and on_free.pending_plan_id is None
    key = bob_key[0]
    key.refresh_from_db()
    assert key.active and key.revoked_at is None  # nothing re-keyed
    assert Event.objects.filter(event_type="subscription.plan_changed", data__plan_id=plans["silver"].pk).exists()


def test_moving_to_a_plan_that_needs_approval_shows_it_pending_until_an_admin_grants_it(
    alice, bob, bob_app, on_free, plans
):
    client = _client(bob)
    url = _plan_url(on_free)
    token = _token(client.get(url).content.decode())
    answer = client.post(url, {"plan": plans["gold"].pk, "csrfmiddlewaretoken": token}, follow=True)
    page = answer.content.decode()
    assert "waiting for an administrator&#x27;s approval" in page or "waiting for an administrator's approval" in page
    assert re.search(r'data-testid="pending-plan">→ Gold, waiting for approval', page)
    on_free.refresh_from_db()
    assert (on_free.plan_id, on_free.pending_plan_id) == (plans["free"].pk, plans["gold"].pk)
    assert "Waiting for approval: a move to <strong>Gold</strong>" in client.get(url).content.decode()
    services.subscription_change_plan(subscription=on_free, plan=plans["gold"], actor=alice)
    on_free.refresh_from_db()
    assert (on_free.plan_id, on_free.pending_plan_id) == (plans["gold"].pk, None)
    assert 'data-testid="pending-plan"' not in client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()


def test_a_plan_change_needs_the_csrf_token_and_a_plan_on_offer(bob, on_free, plans, globex, carol):
    client = _client(bob)
    url = _plan_url(on_free)
    assert client.post(url, {"plan": plans["silver"].pk}).status_code == 403
    token = _token(client.get(url).content.decode())
    foreign = services.plan_create(tenant=globex, name="Globex gold", actor=carol)
    for plan_id in (plans["old"].pk, plans["free"].pk, foreign.pk, ""):
        answer = client.post(url, {"plan": plan_id, "csrfmiddlewaretoken": token})
        assert answer.status_code == 400
        assert "Select a valid choice" in answer.content.decode() or "Choose the plan to move to." in (
            answer.content.decode()
        )
    on_free.refresh_from_db()
    assert on_free.plan_id == plans["free"].pk and on_free.pending_plan_id is None


def test_nobody_else_can_change_a_developers_plan(bob, dave, vera, on_free, plans, carol):
    url = _plan_url(on_free)
    other = Client()
    other.force_login(dave)
    assert other.get(url).status_code == 404
    assert other.post(url, {"plan": plans["silver"].pk}).status_code == 404
    viewer = Client()
    viewer.force_login(vera)
    assert viewer.get(url).status_code == 403
    stranger = Client()
    stranger.force_login(carol)
    assert stranger.post(url, {"plan": plans["silver"].pk}).status_code == 302  # sent to sign in
    on_free.refresh_from_db()
    assert on_free.plan_id == plans["free"].pk and on_free.pending_plan_id is None


def test_a_cancelled_subscription_offers_no_plan_change(bob, bob_app, on_free, plans):
    services.subscription_cancel(subscription=on_free, actor=bob)
    client = _client(bob)
    assert "Change plan" not in client.get(f"/portal/acme/apps/{bob_app.pk}/").content.decode()
    page = client.get(_plan_url(on_free)).content.decode()
    assert "A cancelled subscription cannot change plan" in page and 'name="plan"' not in page
