"""Plans on an API's page: cards in words, a required choice, the subscribe flow, and the limit it buys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User
from django.test import Client

import apimgmt.echo
from apimgmt import services
from apimgmt.models import Api, Consumer, Plan, Subscription, Tenant
from tests.support.servers import gunicorn, wsgi_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def starter(acme: Tenant) -> Plan:
    per_minute = services.policy_create(
        tenant=acme, name="5-a-minute", policy_type="rate_limiting", config={"requests_per_minute": 5}, actor=None
    )
    monthly = services.policy_create(
        tenant=acme, name="10k-a-month", policy_type="quota", config={"requests_per_month": 10000}, actor=None
    )
    return services.plan_create(
        tenant=acme, name="starter", description="For trying it out.", policies=[per_minute, monthly], actor=None
    )


@pytest.fixture
def pro(acme: Tenant) -> Plan:
    per_minute = services.policy_create(
        tenant=acme, name="600-a-minute", policy_type="rate_limiting", config={"requests_per_minute": 600}, actor=None
    )
    return services.plan_create(tenant=acme, name="pro", approval="manual", policies=[per_minute], actor=None)


@pytest.fixture
def planned_api(acme_api: Api, starter: Plan, pro: Plan) -> Api:
    return services.api_update(api=acme_api, plans=[starter, pro], actor=None)


def test_the_api_page_shows_each_plan_with_its_limits_in_words(planned_api: Api) -> None:
    page = Client().get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    assert page.count('class="plan-card"') == 2
    starter_card = page[page.index('data-plan="starter"') :][:600]
    assert "5 requests per minute, 10,000 per month" in starter_card and "Approved at once" in starter_card
    pro_card = page[page.index('data-plan="pro"') :][:600]
    assert "600 requests per minute" in pro_card and "Needs approval" in pro_card


def test_no_plan_is_preselected_and_there_is_no_default_plan(
    bob_client: Client, bob_app: Consumer, planned_api: Api
) -> None:
    page = bob_client.get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    assert "Default (no plan)" not in page
    assert 'name="plan"' in page and "checked" not in page
    assert "starter: 5 requests per minute, 10,000 per month" in page
    assert "pro: 600 requests per minute (needs approval)" in page


def test_subscribing_without_a_plan_is_refused(bob_client: Client, bob_app: Consumer, planned_api: Api) -> None:
    response = bob_client.post(f"/portal/acme/apis/{planned_api.pk}/subscribe/", {"app": bob_app.pk})
    assert response.status_code == 400
    assert "Choose a plan" in response.content.decode()
    assert not Subscription.objects.exists()


def test_a_plan_the_api_does_not_offer_is_refused(
    bob_client: Client, bob_app: Consumer, planned_api: Api, acme: Tenant
) -> None:
    other = services.plan_create(tenant=acme, name="internal", actor=None)
    response = bob_client.post(f"/portal/acme/apis/{planned_api.pk}/subscribe/", {"app": bob_app.pk, "plan": other.pk})
    assert response.status_code == 400
    assert not Subscription.objects.exists()


def test_choosing_a_plan_subscribes_on_it(
    bob_client: Client, bob_app: Consumer, planned_api: Api, starter: Plan
) -> None:
    response = bob_client.post(
        f"/portal/acme/apis/{planned_api.pk}/subscribe/", {"app": bob_app.pk, "plan": starter.pk}, follow=True
    )
    assert "bob-app is subscribed to users on the starter plan. Its keys work now." in response.content.decode()
    assert Subscription.objects.get(consumer=bob_app).plan == starter


def test_an_already_subscribed_app_is_not_offered_the_form_again(
    bob_client: Client, bob: User, bob_app: Consumer, planned_api: Api, starter: Plan, acme: Tenant
) -> None:
    services.subscription_request(consumer=bob_app, api=planned_api, plan=starter, actor=bob)
    page = bob_client.get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    assert 'action="/portal/acme/apis/' not in page
    assert "All your apps are subscribed to this API." in page
    other = services.consumer_create(tenant=acme, name="second-app", owner=bob, actor=bob)
    page = bob_client.get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    form = page[page.index('action="/portal/acme/apis/') :]
    assert f'value="{other.pk}"' in form and f'value="{bob_app.pk}"' not in form


def test_create_an_app_from_an_api_page_comes_back_with_it_chosen(
    bob_client: Client, bob: User, planned_api: Api
) -> None:
    page = bob_client.get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    link = f"/portal/acme/apps/new/?for_api={planned_api.pk}"
    assert f'href="{link}"' in page
    response = bob_client.post(link, {"name": "weather", "description": ""})
    app = Consumer.objects.get(name="weather", owner=bob)
    assert response.status_code == 302
    assert response["Location"] == f"/portal/acme/apis/{planned_api.pk}/?app={app.pk}#subscribe-h"
    page = bob_client.get(response["Location"].split("#")[0]).content.decode()
    assert f'<option value="{app.pk}" selected>weather</option>' in page
    assert "App weather created. Choose a plan and subscribe it below." in page


def test_for_api_names_only_apis_of_this_portals_catalog(bob_client: Client, bob: User, globex: Tenant) -> None:
    foreign = services.api_create(
        tenant=globex, api_name="g", base_path="/g", upstream_url="https://g.example.com", status="active", actor=None
    )
    response = bob_client.post(f"/portal/acme/apps/new/?for_api={foreign.pk}", {"name": "x", "description": ""})
    assert response["Location"] == f"/portal/acme/apps/{Consumer.objects.get(name='x').pk}/"


def test_portal_errors_say_app_not_consumer(bob_client: Client, bob_app: Consumer, acme_api: Api) -> None:
    services.consumer_block(consumer=bob_app, actor=None)
    response = bob_client.post(f"/portal/acme/apis/{acme_api.pk}/subscribe/", {"app": bob_app.pk})
    text = response.content.decode()
    assert response.status_code == 400 and "This app is blocked." in text
    assert "consumer" not in text.lower() and "tenant" not in text.lower()


@pytest.fixture
def echo_url() -> Iterator[str]:
    with wsgi_server(apimgmt.echo.app) as url:
        yield url


def test_after_choosing_starter_the_sixth_call_in_a_minute_gets_429(
    transactional_db: Any,
    acme: Tenant,
    bob: User,
    bob_client: Client,
    starter: Plan,
    pro: Plan,
    echo_url: str,
    settings: Any,
    live_env: dict[str, str],
    redis_client: Any,
) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    api = services.api_create(
        tenant=acme,
        api_name="echo",
        base_path="/echo",
        upstream_url=echo_url,
        status="active",
        plans=[starter, pro],
        actor=None,
    )
    app = services.consumer_create(tenant=acme, name="weather", owner=bob, actor=bob)
    assert bob_client.post(f"/portal/acme/apis/{api.pk}/subscribe/", {"app": app.pk}).status_code == 400
    assert (
        bob_client.post(f"/portal/acme/apis/{api.pk}/subscribe/", {"app": app.pk, "plan": starter.pk}).status_code
        == 302
    )
    _key, plaintext = services.api_key_create(consumer=app, actor=bob)
    with gunicorn(live_env, workers=1) as base:
        statuses = []
        for _ in range(6):
            statuses.append(requests.get(f"{base}/echo/hello", headers={"X-API-Key": plaintext}, timeout=10))
        assert [r.status_code for r in statuses] == [200, 200, 200, 200, 200, 429]
        assert int(statuses[-1].headers["Retry-After"]) > 0


def test_an_archived_plan_gets_no_card(planned_api: Api, pro: Plan) -> None:
    services.plan_archive(plan=pro, actor=None)
    page = Client().get(f"/portal/acme/apis/{planned_api.pk}/").content.decode()
    assert 'data-plan="starter"' in page and 'data-plan="pro"' not in page
