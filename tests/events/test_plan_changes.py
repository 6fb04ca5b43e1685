"""Plan changes without re-keying: now (quota used this window carries over, on the gateway's own counters) or at
the next quota window in the tenant's zone; audited, subscription.plan_changed emitted; archived plans take no new
subscriptions; a plan nobody is on any more can be deleted."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from apimgmt import events, services
from apimgmt.models import AuditEvent, Event, Plan, Policy, Subscription, Tenant
from apimgmt.redis_client import get_redis, reset_redis
from gateway.wsgi import reset_gateway
from tests.gateway.conftest import InProcessGateway, publish
from tests.gateway.upstreams import Recorder, recording_upstream
from tests.support.quotas import quota_window
from tests.support.servers import free_port

V1 = "/mgmt/v1"


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@pytest.fixture
def gateway(settings: Any, tmp_path: Any) -> Iterator[InProcessGateway]:
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}
    gw = InProcessGateway()
    yield gw
    reset_gateway()


@pytest.fixture
def plans(acme, alice) -> tuple[Plan, Plan]:
    """acme's "small" plan (5 requests a day) and "big" plan (8 a day), each counted per consumer."""
    small_quota = services.policy_create(
        tenant=acme, name="five", policy_type="quota", config={"requests_per_day": 5}, actor=alice
    )
    big_quota = services.policy_create(
        tenant=acme, name="eight", policy_type="quota", config={"requests_per_day": 8}, actor=alice
    )
    small = services.plan_create(tenant=acme, name="small", policies=[small_quota], actor=alice)
    big = services.plan_create(tenant=acme, name="big", policies=[big_quota], actor=alice)
    return small, big


@pytest.fixture
def on_small(acme, bob_app, plans, upstream, django_capture_on_commit_callbacks) -> Subscription:
    small, big = plans
    api = publish(acme, upstream.url, plans=[small, big])
    with django_capture_on_commit_callbacks(execute=True):
        return services.subscription_request(consumer=bob_app, api=api, plan=small, actor=None)


def _statuses(gateway: InProcessGateway, key: str, n: int) -> list[int]:
    return [gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status for _ in range(n)]


def test_change_now_keeps_the_key_and_the_quota_already_used_today(
    gateway,
    on_small,
    plans,
    bob_key,
    alice,
    client_for,
    django_capture_on_commit_callbacks,
):
    small, big = plans
    _key, plaintext = bob_key
    assert _statuses(gateway, plaintext, 4) == [200] * 4  # 4 of small's 5
    with django_capture_on_commit_callbacks(execute=True):
        r = client_for(alice).post(
            f"{V1}/subscriptions/{on_small.pk}/change-plan/", {"plan_id": big.pk, "effective": "now"}, format="json"
        )
    assert r.status_code == 200, r.content
    assert r.json()["plan_id"] == big.pk and r.json()["pending_plan_id"] is None
    time.sleep(1.2)  # every gateway worker follows a key-level change within a second
    # The same key, on big's 8: the 4 already used today count, so 4 more and then 429.
    assert _statuses(gateway, plaintext, 6) == [200] * 4 + [429] * 2
    day_keys = [k for k in get_redis().scan_iter("rate_limit:{acme}:*") if b":day@" in k or ":day@" in str(k)]
    by_policy = {big.policies.get().pk: 8, small.policies.get().pk: 4}
    for name in day_keys:
        policy_id = (name.decode() if isinstance(name, bytes) else name).split(":")[2]
        assert int(get_redis().get(name)) == by_policy[policy_id]
    event = Event.objects.get(event_type="subscription.plan_changed")
    assert event.data["previous_plan_id"] == small.pk and event.data["plan_id"] == big.pk
    assert event.data["effective"] == "now"
    audit = AuditEvent.objects.get(action="subscription.change_plan", object_id=on_small.pk)
    assert audit.changes == {"plan_id": [small.pk, big.pk], "effective": "now"}


def test_switching_back_and_forth_in_one_window_never_forgets_traffic(
    gateway, on_small, plans, bob_key, django_capture_on_commit_callbacks
):
    small, big = plans
    _key, plaintext = bob_key
    assert _statuses(gateway, plaintext, 3) == [200] * 3
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)
    time.sleep(1.2)
    assert _statuses(gateway, plaintext, 2) == [200] * 2  # 5 of big's 8 used
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=small, actor=None)
    time.sleep(1.2)
    assert _statuses(gateway, plaintext, 1) == [429]  # 5 used: small's 5 are gone


def test_change_at_the_next_period_waits_for_the_tenants_next_quota_window(acme, on_small, plans, alice, client_for):
    services.tenant_update(tenant=acme, timezone="Europe/Berlin", actor=None)
    small, big = plans
    r = client_for(alice).post(
        f"{V1}/subscriptions/{on_small.pk}/change-plan/",
        {"plan_id": big.pk, "effective": "next_period"},
        format="json",
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["plan_id"] == small.pk and body["pending_plan_id"] == big.pk
    local_now = timezone.now().astimezone(ZoneInfo("Europe/Berlin"))
    tomorrow = datetime.combine(local_now.date() + timedelta(days=1), datetime.min.time(), ZoneInfo("Europe/Berlin"))
    switch = Subscription.objects.get(pk=on_small.pk).plan_change_at
    assert switch == tomorrow
    assert not Event.objects.filter(event_type="subscription.plan_changed").exists()
    assert services.subscription_apply_due_plan_changes(now=tomorrow - timedelta(seconds=1)) == 0
    assert services.subscription_apply_due_plan_changes(now=tomorrow) == 1
    assert services.subscription_apply_due_plan_changes(now=tomorrow + timedelta(hours=1)) == 0  # once
    on_small.refresh_from_db()
    assert (on_small.plan_id, on_small.pending_plan_id, on_small.plan_change_at) == (big.pk, None, None)
    event = Event.objects.get(event_type="subscription.plan_changed")
    assert event.data["effective"] == "next_period"
    assert datetime.fromisoformat(event.data["effective_at"]) == tomorrow


def test_a_monthly_quota_moves_the_change_to_the_first_of_next_month(acme, plans, alice):
    monthly = services.policy_create(
        tenant=acme, name="monthly", policy_type="quota", config={"requests_per_month": 1000}, actor=alice
    )
    plan = services.plan_create(tenant=acme, name="monthly", policies=[monthly], actor=alice)
    now = datetime(2026, 1, 31, 23, 30, tzinfo=ZoneInfo("UTC"))
    assert services.plan_change_boundary(plan=plan, tz_name="Asia/Tokyo", now=now) == datetime(
        2026, 2, 1, tzinfo=ZoneInfo("Asia/Tokyo")
    ).astimezone(ZoneInfo("UTC")).replace(month=2, day=28, hour=15)
    assert services.plan_change_boundary(plan=None, tz_name="UTC", now=now) == datetime(
        2026, 2, 1, tzinfo=ZoneInfo("UTC")
    )


def test_bad_changes_are_400s_naming_the_field(on_small, plans, acme, alice, client_for, globex, carol):
    small, big = plans
    c = client_for(alice)
    url = f"{V1}/subscriptions/{on_small.pk}/change-plan/"
    r = c.post(url, {"plan_id": small.pk}, format="json")
    assert r.status_code == 400 and "already on plan 'small'" in r.json()["errors"]["plan_id"][0]
    r = c.post(url, {"plan_id": big.pk, "effective": "tomorrow"}, format="json")
    assert r.status_code == 400 and "effective" in r.json()["errors"]
    foreign = services.plan_create(tenant=globex, name="theirs", actor=carol)
    r = c.post(url, {"plan_id": foreign.pk}, format="json")
    assert r.status_code == 400 and "Unknown plan" in r.json()["errors"]["plan_id"][0]
    unoffered = services.plan_create(tenant=acme, name="unoffered", actor=alice)
    r = c.post(url, {"plan_id": unoffered.pk}, format="json")
    assert r.status_code == 400 and "not offered" in r.json()["errors"]["plan_id"][0]
    assert Subscription.objects.get(pk=on_small.pk).plan_id == small.pk


def test_a_developer_moves_to_an_automatic_plan_and_asks_for_one_that_needs_approval(
    acme, on_small, plans, bob, vera, alice, client_for, django_capture_on_commit_callbacks
):
    small, big = plans
    manual = services.plan_create(tenant=acme, name="gold", approval="manual", actor=alice)
    services.api_update(api=on_small.api, plans=[small, big, manual], actor=alice)
    url = f"{V1}/subscriptions/{on_small.pk}/change-plan/"
    assert client_for(vera).post(url, {"plan_id": big.pk}, format="json").status_code == 403  # viewers read only
    c = client_for(bob)
    r = c.post(url, {"plan_id": big.pk, "effective": "next_period"}, format="json")
    assert r.status_code == 400 and "tenant admins schedule" in r.json()["errors"]["effective"][0]
    with django_capture_on_commit_callbacks(execute=True):
        r = c.post(url, {"plan_id": big.pk}, format="json")
    assert r.status_code == 200 and r.json()["plan_id"] == big.pk  # automatic: moved at once
    r = c.post(url, {"plan_id": manual.pk}, format="json")
    assert r.status_code == 202 and r.json()["plan_id"] == big.pk and r.json()["pending_plan_id"] == manual.pk
    assert AuditEvent.objects.filter(action="subscription.request_plan_change", object_id=on_small.pk).exists()
    assert services.subscription_apply_due_plan_changes() == 0  # a request waits for an admin, not for a date
    with django_capture_on_commit_callbacks(execute=True):
        r = client_for(alice).post(url, {"plan_id": manual.pk}, format="json")
    assert r.status_code == 200 and r.json()["plan_id"] == manual.pk and r.json()["pending_plan_id"] is None
    assert Event.objects.filter(event_type="subscription.plan_changed").count() == 2


def test_an_archived_plan_keeps_its_subscribers_takes_no_new_ones_and_goes_once_unused(
    acme,
    on_small,
    plans,
    bob,
    alice,
    client_for,
):
    small, big = plans
    c = client_for(alice)
    r = c.post(f"{V1}/plans/{small.pk}/archive/", {}, format="json")
    assert r.status_code == 200 and r.json()["archived_at"]
    assert Subscription.objects.get(pk=on_small.pk).status == "active"  # untouched
    other = services.consumer_create(tenant=acme, name="other", owner=bob, actor=bob)
    small.refresh_from_db()
    with pytest.raises(ValidationError, match="archived and takes no new subscriptions"):
        services.subscription_request(consumer=other, api=on_small.api, plan=small, actor=bob)
    # Still on it: deleting is refused, saying how to free it.
    r = c.delete(f"{V1}/plans/{small.pk}/")
    assert r.status_code == 409 and "change-plan" in r.json()["detail"]
    services.subscription_change_plan(subscription=on_small, plan=big, actor=alice)
    with pytest.raises(ValidationError, match="archived"):
        services.subscription_change_plan(subscription=on_small, plan=small, actor=alice)
    assert c.delete(f"{V1}/plans/{small.pk}/").status_code == 204
    assert not Plan.objects.filter(pk=small.pk).exists()


def test_a_plan_that_subscriptions_are_scheduled_to_move_to_cannot_be_deleted(on_small, plans, alice):
    _small, big = plans
    services.subscription_change_plan(subscription=on_small, plan=big, effective="next_period", actor=alice)
    reason = services.plan_delete_refusal(big)
    assert reason is not None and "1 scheduled to move to it" in reason
    services.subscription_cancel(subscription=on_small, actor=alice)  # a cancelled subscription moves nowhere
    assert services.plan_delete_refusal(big) is None
    assert Subscription.objects.get(pk=on_small.pk).pending_plan_id is None


@pytest.mark.django_db(transaction=True)
def test_a_change_with_redis_unreachable_commits_answers_200_and_warns(
    on_small, plans, alice, client_for, settings, caplog, monkeypatch
):
    small, big = plans
    redis_url = settings.REDIS_URL
    get_redis().set(_day_key(small, on_small), 4, ex=86400 + 60)
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: Redis is "down"
    reset_redis()
    with caplog.at_level(logging.WARNING, logger="apimgmt.services"):
        r = client_for(alice).post(
            f"{V1}/subscriptions/{on_small.pk}/change-plan/", {"plan_id": big.pk, "effective": "now"}, format="json"
        )
    assert r.status_code == 200, r.content
    assert Subscription.objects.get(pk=on_small.pk).plan_id == big.pk
    assert Event.objects.filter(event_type="subscription.plan_changed").count() == 1
    (warning,) = [r for r in caplog.records if r.name == "apimgmt.services" and on_small.pk in r.getMessage()]
    assert "quota" in warning.getMessage()
    # Redis is back: the deliverer carries over what the change could not.
    settings.REDIS_URL = redis_url
    reset_redis()
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")
    assert int(get_redis().get(_day_key(big, on_small))) == 4


def _day_key(plan: Plan, subscription: Subscription) -> str:
    """The key of today's counter of ``plan``'s daily quota for the subscription's consumer."""
    return _policy_day_key(plan.policies.get(), subscription)


def test_requests_counted_on_the_old_plan_after_the_change_are_carried_over_by_the_deliverer(
    on_small, plans, monkeypatch, django_capture_on_commit_callbacks
):
    small, big = plans
    redis = get_redis()
    redis.set(_day_key(small, on_small), 3, ex=86400 + 60)
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)
    assert int(redis.get(_day_key(big, on_small))) == 3  # carried at commit
    # A gateway that has not followed the change yet counts two more requests on small's counter.
    redis.incrby(_day_key(small, on_small), 2)
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")
    assert int(redis.get(_day_key(big, on_small))) == 5
    # Exactly once: another round adds nothing, nor does a deliverer that completed the pass and died before it
    # could mark the change done (its per-window markers hold).
    redis.incrby(_day_key(big, on_small), 1)  # big's own traffic since
    call_command("deliver_events")
    event = Event.objects.get(event_type="subscription.plan_changed")
    assert redis.delete(f"plan_carry:{{acme}}:{event.pk}:done") == 1
    assert services.plan_carry_over_complete(client=redis) == 0
    assert int(redis.get(_day_key(big, on_small))) == 6
    assert redis.ttl(_day_key(big, on_small)) > 0


def test_the_second_carry_over_waits_until_every_gateway_follows_the_change(
    on_small, plans, django_capture_on_commit_callbacks
):
    small, big = plans
    redis = get_redis()
    redis.set(_day_key(small, on_small), 3, ex=86400 + 60)
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)
    call_command("deliver_events")  # dispatched now; its second pass is due in PLAN_CARRY_SETTLE_SECONDS
    redis.incrby(_day_key(small, on_small), 2)  # counted by a gateway within that time
    assert services.plan_carry_over_complete(client=redis) == 0
    later = timezone.now() + timedelta(seconds=services.PLAN_CARRY_SETTLE_SECONDS + 1)
    assert services.plan_carry_over_complete(client=redis, now=later) == 1
    assert int(redis.get(_day_key(big, on_small))) == 5


def _quota(acme: Tenant, name: str, per_day: int) -> Policy:
    return services.policy_create(
        tenant=acme, name=name, policy_type="quota", config={"requests_per_day": per_day}, actor=None
    )


def _subscribe(acme: Tenant, bob_app: Any, upstream: Recorder, plan: Plan, *others: Plan) -> Subscription:
    return services.subscription_request(
        consumer=bob_app, api=publish(acme, upstream.url, plans=[plan, *others]), plan=plan, actor=None
    )


def _policy_day_key(policy: Policy, subscription: Subscription) -> str:
    return quota_window(policy, subscription.consumer_id, timezone.now().timestamp()).key


def test_traffic_on_a_counter_both_plans_share_is_not_carried_a_second_time(
    acme, bob_app, upstream, monkeypatch, django_capture_on_commit_callbacks
):
    # small = {cap, five}, big = {cap, eight}: the per-consumer daily cap is one counter on both plans.
    cap, five, eight = _quota(acme, "cap", 1000), _quota(acme, "five", 50), _quota(acme, "eight", 80)
    small = services.plan_create(tenant=acme, name="small", policies=[cap, five], actor=None)
    big = services.plan_create(tenant=acme, name="big", policies=[cap, eight], actor=None)
    with django_capture_on_commit_callbacks(execute=True):
        subscription = _subscribe(acme, bob_app, upstream, small, big)
    redis = get_redis()
    for policy in (cap, five):
        redis.set(_policy_day_key(policy, subscription), 3, ex=86400 + 60)  # 3 requests on small
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=subscription, plan=big, actor=None)
    assert int(redis.get(_policy_day_key(eight, subscription))) == 3
    for policy in (cap, five):  # 2 requests of a gateway still on small
        redis.incrby(_policy_day_key(policy, subscription), 2)
    for policy in (cap, eight):  # 2 requests of gateways on big
        redis.incrby(_policy_day_key(policy, subscription), 2)
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")
    # 7 requests in all. cap's growth (4) was mostly big's own traffic: only five's (2, the lagging gateway's) counts.
    assert int(redis.get(_policy_day_key(cap, subscription))) == 7
    assert int(redis.get(_policy_day_key(eight, subscription))) == 7


def test_changing_back_within_the_settle_time_counts_each_request_once(
    acme, bob_app, upstream, monkeypatch, django_capture_on_commit_callbacks
):
    five, eight = _quota(acme, "five", 50), _quota(acme, "eight", 80)
    small = services.plan_create(tenant=acme, name="small", policies=[five], actor=None)
    big = services.plan_create(tenant=acme, name="big", policies=[eight], actor=None)
    with django_capture_on_commit_callbacks(execute=True):
        subscription = _subscribe(acme, bob_app, upstream, small, big)
    redis = get_redis()
    redis.set(_policy_day_key(five, subscription), 10, ex=86400 + 60)  # 10 requests on small
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=subscription, plan=big, actor=None)
    redis.incrby(_policy_day_key(eight, subscription), 10)  # 10 on big
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=subscription, plan=small, actor=None)
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")
    call_command("deliver_events")
    # 20 requests: the first change's second pass would have taken the second one's carry for new traffic (30).
    assert int(redis.get(_policy_day_key(five, subscription))) == 20
    assert int(redis.get(_policy_day_key(eight, subscription))) == 20


def test_a_late_second_pass_only_raises_the_new_counters_and_says_so(
    on_small, plans, caplog, django_capture_on_commit_callbacks
):
    small, big = plans
    redis = get_redis()
    redis.set(_day_key(small, on_small), 3, ex=86400 + 60)
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)
    redis.incrby(_day_key(small, on_small), 4)  # small's counter gained 4 since (7) ...
    redis.incrby(_day_key(big, on_small), 1)  # ... and big's 1 (4)
    # Run a minute and more past due, the gain on small could be anything (here: as much as a second subscription
    # of the consumer on another API with the same policy counted): big is only raised to small's 7, not given +4.
    late = timezone.now() + timedelta(seconds=services.PLAN_CARRY_SETTLE_SECONDS + 65)
    with caplog.at_level(logging.WARNING, logger="apimgmt.services"):
        assert services.plan_carry_over_complete(client=redis, now=late) == 1
    assert int(redis.get(_day_key(big, on_small))) == 7
    (warning,) = [r for r in caplog.records if on_small.pk in r.getMessage()]
    assert "raised to the old plan's" in warning.getMessage()
    assert services.plan_carry_over_complete(client=redis, now=late) == 0  # once


def test_with_redis_down_at_the_change_and_at_dispatch_the_quota_still_carries_over(
    on_small, plans, settings, monkeypatch, django_capture_on_commit_callbacks
):
    small, big = plans
    get_redis().set(_day_key(small, on_small), 4, ex=86400 + 60)
    redis_url = settings.REDIS_URL
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: Redis is "down"
    reset_redis()
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)  # first pass fails
    with pytest.raises(CommandError, match="Redis scans failed"):
        call_command("deliver_events")  # the event is dispatched during the same outage
    assert Event.objects.get(event_type="subscription.plan_changed").dispatched_at is not None
    settings.REDIS_URL = redis_url
    reset_redis()
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    call_command("deliver_events")  # the change is found in the database, not in a queue Redis never got
    assert int(get_redis().get(_day_key(big, on_small))) == 4
    get_redis().incrby(_day_key(small, on_small), 1)
    call_command("deliver_events")  # once
    assert int(get_redis().get(_day_key(big, on_small))) == 4


def test_a_change_committed_just_after_midnight_carries_into_the_new_days_counters(
    on_small, plans, monkeypatch, django_capture_on_commit_callbacks
):
    small, big = plans
    redis = get_redis()
    redis.set(_day_key(small, on_small), 4, ex=86400 + 60)
    emit = events.emit
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)

    def emitted_before_midnight(**kwargs: Any) -> Event | None:
        # The change's transaction began (and stamped its event) just before the UTC day rolled over.
        event = emit(**kwargs)
        if event is not None:
            event.occurred_at = today - timedelta(milliseconds=100)
            event.save(update_fields=["occurred_at"])
        return event

    monkeypatch.setattr(events, "emit", emitted_before_midnight)
    with django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)
    assert int(redis.get(_day_key(big, on_small)) or 0) == 4  # today's counter, not yesterday's


def test_a_programming_error_in_the_carry_over_is_not_taken_for_a_redis_outage(
    on_small, plans, monkeypatch, django_capture_on_commit_callbacks
):
    _small, big = plans

    def broken(**_kwargs: Any) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr(services, "carry_over_quota", broken)
    with pytest.raises(TypeError, match="a bug"), django_capture_on_commit_callbacks(execute=True):
        services.subscription_change_plan(subscription=on_small, plan=big, actor=None)


def test_a_change_whose_carry_over_fails_is_set_aside_and_later_changes_still_carry(
    acme, on_small, plans, monkeypatch, caplog, django_capture_on_commit_callbacks
):
    # Changes are completed oldest first: one that failed each time would hold up every later one for two days.
    small, big = plans
    other_app = services.consumer_create(tenant=acme, name="other-app", actor=None)
    with django_capture_on_commit_callbacks(execute=True):
        on_other = services.subscription_request(consumer=other_app, api=on_small.api, plan=small, actor=None)
    redis = get_redis()
    for subscription in (on_small, on_other):
        with django_capture_on_commit_callbacks(execute=True):
            services.subscription_change_plan(subscription=subscription, plan=big, actor=None)
        redis.incrby(_day_key(small, subscription), 2)  # counted by a gateway not yet on the new plan
    first = Event.objects.filter(event_type="subscription.plan_changed").earliest("occurred_at")
    complete = services._complete_change

    def broken_for_the_first(event: Event, **kwargs: Any) -> int:
        if event.pk == first.pk:
            raise KeyError("a row of a shape the code did not expect")
        return complete(event, **kwargs)

    monkeypatch.setattr(services, "_complete_change", broken_for_the_first)
    monkeypatch.setattr(services, "PLAN_CARRY_SETTLE_SECONDS", 0.0)
    with caplog.at_level(logging.ERROR, logger="apimgmt.services"):
        services.plan_carry_over_complete(client=redis)
    assert int(redis.get(_day_key(big, on_other))) == 2  # the later change carried
    assert int(redis.get(_day_key(big, on_small)) or 0) == 0  # the failed one was set aside, and said so
    assert any(first.pk in record.getMessage() for record in caplog.records if record.levelno == logging.ERROR)
    assert services.plan_carry_over_complete(client=redis) == 0  # and is not retried in every scan
