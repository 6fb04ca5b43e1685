"""circuit.opened / circuit.closed: every gateway worker has its own breaker per API, yet a failing upstream is
announced once, and its recovery once, however many workers open and close their breakers.

The end-to-end test runs gunicorn with two workers in front of a real upstream on loopback that answers 503, and
waits (from the workers' own log lines) until both workers opened their breakers.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from apimgmt import circuit_events, events, webhooks
from apimgmt.models import Api, Event
from gateway.resilience import ANNOUNCER, CircuitBreaker
from tests.gateway.conftest import publish, subscribe
from tests.gateway.upstreams import Answer, recording_upstream
from tests.support.servers import gunicorn

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "events"
PATH = "/api/users/v1/x"


def _workers_logging(log: Path, words: str, api_id: str) -> set[str]:
    """Workers (host:pid) whose log says their breaker for ``api_id`` did ``words`` ("opened"/"closed")."""
    found = set()
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("api_id") == api_id and str(record.get("message", "")).startswith(f"circuit {words}"):
            found.add(record["worker"])
    return found


def _hammer_until(url: str, key: str, log: Path, words: str, api_id: str, *, timeout: float = 60.0) -> None:
    """Requests on fresh connections (so both workers get some) until both workers logged ``words``."""
    deadline = time.monotonic() + timeout
    while len(_workers_logging(log, words, api_id)) < 2:
        assert time.monotonic() < deadline, f"both workers did not log circuit {words}"
        for _ in range(10):
            requests.get(url + PATH, headers={"X-API-Key": key, "Connection": "close"}, timeout=10)
        time.sleep(0.2)


def _circuit_events(api: Api) -> list[str]:
    return list(
        Event.objects.filter(event_type__startswith="circuit.", data__api_id=api.pk)
        .order_by("occurred_at", "id")
        .values_list("event_type", flat=True)
    )


@pytest.mark.django_db(transaction=True)
def test_two_gunicorn_workers_opening_their_breakers_announce_one_circuit_opened_then_one_closed(
    live_env, acme, alice, bob_app, bob_key, redis_client, tmp_path, receiver
):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice, event_types=["circuit.opened"])
    with recording_upstream() as upstream:
        healthy = {"ok": False}
        upstream.respond = lambda seen: Answer() if healthy["ok"] else Answer(status=503, body=b"down")
        api = publish(acme, upstream.url, cb_failure_threshold=2, cb_recovery_timeout=2.0)
        subscribe(bob_app, api)
        env = {**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool"), "LOG_LEVEL": "INFO"}
        log = tmp_path / "gunicorn.log"
        with gunicorn(env, workers=2, log_path=log) as url:
            _hammer_until(url, bob_key[1], log, "opened", api.pk)
            assert events.circuit_notices(client=redis_client) == 1
            assert _circuit_events(api) == ["circuit.opened"]
            # The upstream recovers: after the recovery timeout each worker's probe closes its breaker.
            healthy["ok"] = True
            time.sleep(2.1)
            _hammer_until(url, bob_key[1], log, "closed", api.pk)
    assert events.circuit_notices(client=redis_client) == 1
    assert events.circuit_notices(client=redis_client) == 0  # the stream was emptied
    assert _circuit_events(api) == ["circuit.opened", "circuit.closed"]
    opened = Event.objects.get(event_type="circuit.opened")
    assert opened.data["api_id"] == api.pk and opened.data["circuit"] == "open"
    assert opened.data["failure_threshold"] == 2 and opened.data["recovery_timeout_seconds"] == 2.0
    # What a receiver gets validates against the documented schema.
    deliverer = webhooks.Deliverer()
    deliverer.run_once()
    deliverer.close()
    (got,) = receiver.received
    schema = json.loads((SCHEMAS / "circuit.opened.schema.json").read_text())
    jsonschema.validate(got.payload, schema, format_checker=jsonschema.FormatChecker())


def _announce(breaker: CircuitBreaker, state: str) -> bool:
    from gateway.resilience import _Change

    return ANNOUNCER.announce(_Change(breaker.tenant_id, breaker.api_id, state, time.time(), 30.0))


def test_of_many_workers_changing_state_together_exactly_one_announces_each_change(acme, acme_api, redis_client):
    # Sixteen "workers" (other pods included) see the same change at once: one wins each time.
    breakers = [CircuitBreaker(acme_api.pk, 1, 30.0, tenant_id="acme") for _ in range(16)]
    results: list[bool] = []
    lock = threading.Lock()

    def change(breaker: CircuitBreaker, state: str) -> None:
        won = _announce(breaker, state)
        with lock:
            results.append(won)

    for state in ("open", "closed", "open"):
        results.clear()
        threads = [threading.Thread(target=change, args=(b, state)) for b in breakers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 15 + [True]
    assert events.circuit_notices(client=redis_client) == 3
    assert _circuit_events(acme_api) == ["circuit.opened", "circuit.closed", "circuit.opened"]
    # A breaker re-opening after a failed probe (still open) announces nothing, but keeps the state alive.
    assert not _announce(breakers[0], "open")
    ttl = redis_client.ttl(circuit_events.state_key("acme", acme_api.pk))
    assert 0 < ttl <= circuit_events.state_ttl(30.0)


class _DiesBeforeDeleting:
    """The real Redis client of a deliverer that dies right after its commit, before it deletes the entries."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def xdel(self, *args: Any) -> int:
        raise ConnectionError("the deliverer died here")


def test_a_breaker_without_its_tenant_finds_it_and_an_announcement_becomes_one_event(
    acme, globex, acme_api, redis_client
):
    breaker = CircuitBreaker(acme_api.pk, 1, 30.0)  # no tenant given: the announcer looks it up once
    assert _announce(breaker, "open")
    assert ANNOUNCER.tenants[acme_api.pk] == "acme"
    # An entry naming acme's API in globex's stream is dropped, never emitted for either tenant.
    redis_client.sadd(circuit_events.TENANTS_KEY, "globex")
    redis_client.xadd(
        circuit_events.stream_key("globex"), {"api_id": acme_api.pk, "state": "open", "at": "0", "worker": "x"}
    )
    with pytest.raises(ConnectionError):
        events.circuit_notices(client=_DiesBeforeDeleting(redis_client))
    assert _circuit_events(acme_api) == ["circuit.opened"]
    assert events.circuit_notices(client=redis_client) == 0  # the same entries again: nothing twice
    assert _circuit_events(acme_api) == ["circuit.opened"]
    assert redis_client.xlen(circuit_events.stream_key("acme")) == 0
    assert not Event.objects.filter(tenant_id="globex").exists()


def test_the_request_path_only_queues_the_change(acme, acme_api, monkeypatch: Any):
    """A breaker opening on a request adds to the announcer's queue; Redis is talked to by its thread."""
    calls: list[str] = []
    monkeypatch.setattr(ANNOUNCER, "_start", lambda: calls.append("start"))
    monkeypatch.setattr(ANNOUNCER, "running_pid", 0)
    before = len(ANNOUNCER.pending)
    breaker = CircuitBreaker(acme_api.pk, 2, 30.0, tenant_id="acme")
    breaker.failure()
    assert len(ANNOUNCER.pending) == before  # one failure of two: no change
    breaker.failure()
    assert len(ANNOUNCER.pending) == before + 1 and ANNOUNCER.pending[-1].state == "open"
    assert calls == ["start"]
    ANNOUNCER.pending.clear()
