"""The event catalogue: every type has a JSON Schema under docs/events/, and what receivers get validates against it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import jsonschema
from django.utils import timezone

from apimgmt import events, services, webhooks

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "events"


def _schema(event_type: str) -> dict:
    return json.loads((SCHEMAS / f"{event_type}.schema.json").read_text())


def test_every_event_type_has_a_schema_and_every_schema_a_type():
    files = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    assert files == set(events.EVENT_TYPES)
    for event_type in events.EVENT_TYPES:
        schema = _schema(event_type)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["type"] == {"const": event_type}


def test_every_event_a_lifecycle_sends_validates_against_its_schema(acme, acme_api, bob_app, alice, receiver):
    webhooks.webhook_endpoint_create(tenant=acme, url=receiver.url, actor=alice)
    gold = services.plan_create(tenant=acme, name="gold", approval="manual", actor=alice)
    silver = services.plan_create(tenant=acme, name="silver", actor=alice)
    services.api_update(api=acme_api, plans=[gold, silver], actor=alice)
    first = services.subscription_request(consumer=bob_app, api=acme_api, plan=gold, actor=alice)
    services.subscription_reject(subscription=first, actor=alice, note="budget")
    second = services.subscription_request(consumer=bob_app, api=acme_api, plan=gold, actor=alice)
    services.subscription_approve(subscription=second, actor=alice)
    services.subscription_change_plan(subscription=second, plan=silver, actor=alice)
    key, _ = services.api_key_create(consumer=bob_app, actor=alice, expires_at=timezone.now() + timedelta(days=2))
    successor, _ = services.api_key_rotate(key=key, actor=alice, overlap_seconds=60)
    services.api_key_create(consumer=bob_app, actor=alice, expires_at=timezone.now() + timedelta(hours=3))
    events.key_expiring_notices()
    services.api_key_revoke(key=successor, actor=alice)
    services.consumer_block(consumer=bob_app, actor=alice)
    services.consumer_unblock(consumer=bob_app, actor=alice)
    services.api_deprecate(api=acme_api, actor=alice, sunset_at=timezone.now() + timedelta(days=30))
    services.subscription_cancel(subscription=second, actor=alice)
    services.api_retire(api=acme_api, actor=alice)
    deliverer = webhooks.Deliverer()
    deliverer.run_once()
    deliverer.close()
    seen = set()
    for got in receiver.received:
        payload = got.payload
        jsonschema.validate(payload, _schema(payload["type"]), format_checker=jsonschema.FormatChecker())
        seen.add(payload["type"])
    # quota.threshold and circuit.* come from the gateway: tests/events/test_quota_threshold.py and
    # test_circuit_events.py validate them.
    assert seen == set(events.EVENT_TYPES) - {"quota.threshold", "circuit.opened", "circuit.closed"}
