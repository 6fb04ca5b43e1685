"""Delivery fairness: one tenant's slow receiver and its backlog hold at most a few deliverer threads, free slots go
round-robin across tenants, so another tenant's event is delivered within seconds."""

from __future__ import annotations

import threading
import time

from django.db import transaction

from apimgmt import events, services, webhooks
from apimgmt.models import WebhookDelivery
from tests.events.conftest import deliver_events
from tests.support.webhook_receiver import webhook_receiver

BACKLOG = 500
RECEIVER_SECONDS = 2.0


def test_fair_share_takes_tenants_in_turn_within_the_caps():
    candidates = [(1, "e1", "a"), (2, "e1", "a"), (3, "e1", "a"), (4, "e2", "a"), (5, "e3", "b"), (6, "e4", "c")]
    # One per tenant per turn, the longest-waiting tenant first.
    assert webhooks.fair_share(candidates, slots=4, per_endpoint=5, per_tenant=5) == [1, 5, 6, 2]
    # At most two in flight to an endpoint: a's third delivery to e1 waits, its e2 one goes.
    assert webhooks.fair_share(candidates, slots=10, per_endpoint=2, per_tenant=10) == [1, 5, 6, 2, 4]
    # What is in flight already counts: e1 is full, tenant a may hold one more.
    busy = webhooks.fair_share(
        candidates, slots=10, per_endpoint=2, per_tenant=3, busy_endpoints={"e1": 2}, busy_tenants={"a": 2}
    )
    assert busy == [4, 5, 6]


def test_a_tenants_slow_receiver_with_a_backlog_does_not_delay_another_tenants_event(
    live_env, acme, globex, alice, carol
):
    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(_n: int) -> int:
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        time.sleep(RECEIVER_SECONDS)
        with lock:
            in_flight["now"] -= 1
        return 200

    with webhook_receiver() as slow_receiver, webhook_receiver() as other_receiver:
        slow_receiver.status_for = slow
        slow_endpoint, _ = webhooks.webhook_endpoint_create(tenant=acme, url=slow_receiver.url, actor=alice)
        webhooks.webhook_endpoint_create(tenant=globex, url=other_receiver.url, actor=carol)
        with transaction.atomic():
            for n in range(BACKLOG):
                events.emit(
                    tenant_id="acme",
                    event_type="consumer.blocked",
                    data={"consumer_id": f"con_{n}", "name": f"app-{n}", "status": "blocked"},
                )
        globex_app = services.consumer_create(tenant=globex, name="globex-app", actor=carol)
        with deliver_events(live_env, "--follow", "--pause-ms", "100"):
            deadline = time.monotonic() + 30
            while len(slow_receiver.received) < 2:  # acme's backlog is being worked on
                assert time.monotonic() < deadline, "the deliverer did not start on acme's backlog"
                time.sleep(0.05)
            started = time.monotonic()
            services.consumer_block(consumer=globex_app, actor=carol)
            while not other_receiver.received:
                assert time.monotonic() - started < 10, "globex's event waited behind acme's backlog"
                time.sleep(0.02)
            took = time.monotonic() - started
        waiting = WebhookDelivery.objects.filter(endpoint=slow_endpoint, status="pending").count()
    print(f"\nglobex's event delivered {took:.2f} s after it happened; acme's backlog still waiting: {waiting}")
    assert took < 3.0
    assert other_receiver.received[0].payload["tenant_id"] == "globex"
    assert waiting > BACKLOG - 20  # it was not delivered by draining acme's backlog first
    assert in_flight["max"] <= 2  # never more than two attempts at once to one endpoint
