"""``manage.py deliver_events`` as real processes: --follow delivers, serves its metrics and stops on SIGTERM;
key.expiring is sent exactly once per threshold across two processes; a receiver that hangs never slows the admin."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta

import pytest
import redis
from django.test import Client
from django.utils import timezone

from apimgmt import events, services, webhooks
from apimgmt.models import Consumer, Event, WebhookDelivery
from tests.events.conftest import ROOT, deliver_events
from tests.gateway.conftest import publish
from tests.gateway.upstreams import raw_upstream, stall
from tests.support import redis_topologies
from tests.support.quotas import quota_window
from tests.support.servers import free_port, wait_for_port
from tests.support.webhook_receiver import verify


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_follow_delivers_serves_metrics_and_stops_on_sigterm(live_env, acme, alice, bob_app, receiver):
    endpoint, secret = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    port = free_port()
    with deliver_events(live_env, "--follow", "--metrics-port", str(port), "--pause-ms", "100") as proc:
        wait_for_port(port, timeout=30)
        services.consumer_block(consumer=bob_app, actor=alice)
        _wait(lambda: len(receiver.received) == 1)
        assert verify(secret, receiver.received[0].headers, receiver.received[0].body)
        _wait(lambda: WebhookDelivery.objects.filter(status="succeeded").exists())

        def metrics() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

        # The delivery thread counts the attempt just after it records it: the counter may trail the row a moment.
        _wait(lambda: 'apimgmt_webhook_delivery_attempts_total{outcome="succeeded"} 1.0' in metrics())
        text = metrics()
        assert "apimgmt_webhook_events_dispatched_total 1.0" in text
        last = next(line for line in text.splitlines() if line.startswith("apimgmt_webhook_deliverer_last_success"))
        assert abs(float(last.split()[-1]) - time.time()) < 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert WebhookDelivery.objects.get(endpoint=endpoint).attempts == 1


def test_with_redis_down_webhooks_still_go_out_and_the_one_shot_run_says_what_failed(
    live_env, acme, alice, bob_app, receiver
):
    # Quota, circuit and carry-over scans need Redis; the outbox does not. Before, the first failed scan ended each
    # round before any delivery, so no webhook went out until Redis came back.
    endpoint, secret = webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    down = {**live_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    with deliver_events(down, "--follow", "--pause-ms", "100") as proc:
        services.consumer_block(consumer=bob_app, actor=alice)
        _wait(lambda: len(receiver.received) == 1)
        assert verify(secret, receiver.received[0].headers, receiver.received[0].body)
        _wait(lambda: WebhookDelivery.objects.filter(endpoint=endpoint, status="succeeded").exists())
        services.consumer_unblock(consumer=bob_app, actor=alice)
        _wait(lambda: len(receiver.received) == 2)  # later rounds too, while the scans back off
        assert proc.poll() is None
    services.consumer_block(consumer=bob_app, actor=alice)
    result = subprocess.run(
        [sys.executable, "manage.py", "deliver_events"],
        cwd=ROOT,
        env={**os.environ, "WEBHOOK_ALLOW_PRIVATE": "1", **down},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(receiver.received) == 3
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dispatched 1 events; deliveries: 1 succeeded" in result.stdout
    assert "the Redis scans failed (deliveries were made)" in result.stderr


def test_the_first_quota_scan_after_redis_returns_is_not_a_period_late(live_env, acme, bob_app, tmp_path):
    # The quota scan runs every 10 s. One that met Redis down (or was skipped by the back-off) used to count as done,
    # so a crossing already counted when Redis came back was announced up to 10 s later than the back-off allows.
    quota = services.policy_create(
        tenant=acme, name="ten", policy_type="quota", config={"requests_per_day": 10}, actor=None
    )
    plan = services.plan_create(tenant=acme, name="ten", policies=[quota], actor=None)
    api = publish(acme, "https://93.184.215.14", plans=[plan])
    services.subscription_request(consumer=bob_app, api=api, plan=plan, actor=None)
    window = quota_window(quota, bob_app.pk, timezone.now().timestamp())
    redis_port, metrics_port = free_port(), free_port()
    down = {**live_env, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # nothing listens there yet
    servers = redis_topologies._Servers(workdir=tmp_path)
    try:
        with deliver_events(down, "--follow", "--metrics-port", str(metrics_port), "--pause-ms", "100"):
            wait_for_port(metrics_port, timeout=30)

            def rounds_done() -> bool:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
                last = next(x for x in text.splitlines() if x.startswith("apimgmt_webhook_deliverer_last_success"))
                return float(last.split()[-1]) > 0

            _wait(rounds_done)  # a round ran: its quota scan failed, and the Redis scans back off for 1 s
            servers.start(redis_port)
            redis.Redis(port=redis_port).set(window.key, 8, ex=3600)
            up = time.monotonic()
            _wait(lambda: Event.objects.filter(event_type="quota.threshold").exists(), timeout=20)
            waited = time.monotonic() - up
    finally:
        servers.stop_all()
    # The back-off's next try (1 s after the failure, 3 s if Redis was not up yet), not the next 10 s period.
    assert waited < 6.0, waited


def test_key_expiring_is_sent_exactly_once_per_threshold_across_two_delivery_processes(
    live_env, acme, alice, bob_app, receiver
):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice, event_types=["key.expiring"])
    now = timezone.now()
    in_three_days, _ = services.api_key_create(consumer=bob_app, actor=alice, expires_at=now + timedelta(days=3))
    in_twelve_hours, _ = services.api_key_create(consumer=bob_app, actor=alice, expires_at=now + timedelta(hours=12))
    services.api_key_create(consumer=bob_app, actor=alice, expires_at=now + timedelta(days=30))  # not yet
    for _round in range(3):  # two processes at once, three times: each scans and delivers
        with deliver_events(live_env) as first, deliver_events(live_env) as second:
            assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    notices = sorted((r.payload["data"]["key_id"], r.payload["data"]["threshold"]) for r in receiver.received)
    assert notices == sorted([(in_three_days.pk, "7d"), (in_twelve_hours.pk, "1d")])
    # A day later the first key crosses the 1-day threshold: one more notice, once, however often it is scanned.
    later = now + timedelta(days=2, hours=1)
    results: list[int] = []
    scans = [threading.Thread(target=lambda: results.append(events.key_expiring_notices(now=later))) for _ in range(2)]
    for t in scans:
        t.start()
    for t in scans:
        t.join()
    assert events.key_expiring_notices(now=later) == 0
    labels = sorted(Event.objects.filter(event_type="key.expiring").values_list("data__key_id", "data__threshold"))
    assert labels == sorted([(in_three_days.pk, "7d"), (in_three_days.pk, "1d"), (in_twelve_hours.pk, "1d")])


def test_a_rotated_or_revoked_key_gets_no_expiry_notice(acme, alice, bob_app):
    soon = timezone.now() + timedelta(days=2)
    rotated, _ = services.api_key_create(consumer=bob_app, actor=alice, expires_at=soon)
    services.api_key_rotate(key=rotated, actor=alice, overlap_seconds=3600)
    revoked, _ = services.api_key_create(consumer=bob_app, actor=alice, expires_at=soon)
    services.api_key_revoke(key=revoked, actor=alice)
    assert events.key_expiring_notices() == 0


_receiver_connects: list[tuple[str, int]] = []  # this process's connects to the hanging receiver, while armed
_watched_receiver: list[tuple[str, int]] = []


def _record_receiver_connects(event: str, args: tuple) -> None:
    # A real audit event of CPython's socket module (not a mock): every connect this test process makes.
    if event == "socket.connect" and _watched_receiver and tuple(args[1])[:2] == _watched_receiver[0]:
        _receiver_connects.append(_watched_receiver[0])


sys.addaudithook(_record_receiver_connects)


@pytest.mark.django_db(transaction=True)
def test_a_hanging_receiver_does_not_delay_an_admin_save(live_env, acme, alice, globex, carol, staff, settings):
    """acme's receiver hangs; globex has none. Their admin saves, interleaved one by one under the same machine load,
    take the same time; no save opens a connection to the receiver; none waits anywhere near a receiver timeout."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 10.0  # were a save to post itself, each would hang 10 s
    hooked = [services.consumer_create(tenant=acme, name=f"app-{n}", actor=alice) for n in range(12)]
    unhooked = [services.consumer_create(tenant=globex, name=f"app-{n}", actor=carol) for n in range(12)]
    extra = services.consumer_create(tenant=acme, name="first", actor=alice)
    client = Client()
    client.force_login(staff)

    def save(consumer: Consumer) -> float:
        blocking = consumer.status == Consumer.Status.ACTIVE
        action = "block_consumers" if blocking else "unblock_consumers"
        started = time.perf_counter()
        r = client.post("/admin/apimgmt/consumer/", {"action": action, "_selected_action": [consumer.pk]})
        elapsed = time.perf_counter() - started
        assert r.status_code == 302
        consumer.status = Consumer.Status.BLOCKED if blocking else Consumer.Status.ACTIVE
        return elapsed

    for a, g in zip(hooked, unhooked, strict=True):  # warm up
        save(a), save(g)
    # The deliverer waits 60 s on a receiver; it hangs until the receiver closes its connections (leaving the
    # `raw_upstream` block below), so it is still stuck through every save however slow the machine, and stops at once.
    with (
        deliver_events({**live_env, "WEBHOOK_TIMEOUT_SECONDS": "60"}, "--follow", "--pause-ms", "250"),
        raw_upstream(stall) as url,  # entered last, left first: its connections close, the deliverer stops at once
    ):
        webhooks.webhook_endpoint_create(tenant=acme, url=url + "/hook", actor=alice)
        services.consumer_block(consumer=extra, actor=alice)
        # Claimed (leased) and never answered: the deliverer is stuck on the receiver.
        _wait(
            lambda: WebhookDelivery.objects.filter(
                attempts=0, next_attempt_at__gt=timezone.now() + timedelta(seconds=60)
            ).exists()
        )
        host, port = url.removeprefix("http://").split(":")
        _watched_receiver.append((host, int(port)))
        try:
            pairs = [(save(a), save(g)) for _round in range(2) for a, g in zip(hooked, unhooked, strict=True)]
        finally:
            _watched_receiver.clear()
        assert WebhookDelivery.objects.filter(attempts__gt=0).count() == 0  # still hanging throughout
    assert _receiver_connects == []  # by design: a save only writes the outbox row; the deliverer posts
    hanging, control = [p[0] for p in pairs], [p[1] for p in pairs]
    # Paired, so a burst of load on the machine lands on both sides of a pair; the median of 24 pairs ignores bursts.
    assert statistics.median(h - c for h, c in pairs) < 0.050, (hanging, control)
    assert min(hanging) - min(control) < 0.050, (hanging, control)
    assert max(hanging) < 3.0, hanging  # not one save waited for the receiver (10 s here, 60 s in the deliverer)
    assert (
        Event.objects.filter(event_type__in=["consumer.blocked", "consumer.unblocked"]).count() == 3 * 24 + 1
    )  # every save recorded its event
