"""The circuit-event contract between gateway workers and the event deliverer: Redis keys and the announce script.

Each gateway worker keeps its own circuit breaker per API (gateway/resilience.py), so with N workers in M pods an
upstream going down opens up to N·M breakers, each on its own evidence and at its own moment. Receivers want one
``circuit.opened`` and, once it recovers, one ``circuit.closed``. So a worker whose breaker changes state runs
``ANNOUNCE_SCRIPT``, an atomic compare-and-set on the API's announced state:

- ``events:{<tenant>}:circuit:<api>`` (STRING, TTL): the state last announced, ``open`` or ``closed``. Opening
  when it already says ``open`` only renews its TTL; closing when it does not say ``open`` says nothing. Only the
  worker that actually flips it appends to the stream, so announcements alternate opened, closed, opened… however
  many workers and pods see the change. The TTL (``state_ttl``) forgets an ``open`` nobody renews (every
  worker that closed its breaker was stopped before announcing it): the next opening is then announced again.
- ``events:{<tenant>}:circuit`` (STREAM): the announcements, ``api_id``, ``state``, ``at`` (epoch ms), ``worker``;
  capped at about ``STREAM_MAXLEN`` entries. The deliverer copies them into the outbox (apimgmt/events.py,
  ``circuit_notices``), each stream entry once (its id is the event's dedupe key), then deletes them.
- ``events:circuit:tenants`` (SET): tenants that ever announced (where the deliverer looks); only ever touched by
  single-key calls. The script's two keys share the tenant's hash tag, so it runs on one Redis Cluster slot.

Nothing here talks to Redis by itself: ``open_apis`` (the admin home's reader) uses the client it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from apimgmt import redis_client

TENANTS_KEY = "events:circuit:tenants"
STREAM_MAXLEN = 10_000
OPEN = "open"
CLOSED = "closed"


def tag(tenant: str) -> str:
    return redis_client.tenant_tag("events", tenant)


def state_key(tenant: str, api_id: str) -> str:
    return f"{tag(tenant)}:circuit:{api_id}"


def stream_key(tenant: str) -> str:
    return f"{tag(tenant)}:circuit"


def state_ttl(recovery_timeout: float) -> int:
    """How long an announced ``open`` lasts without a worker renewing it: breakers of a still-failing upstream
    re-open every recovery timeout, so a few of those, and never under five minutes."""
    return max(300, int(recovery_timeout * 3) + 1)


# KEYS: state key, stream key. ARGV: new state, ttl seconds, api id, at (epoch ms), worker, stream max length.
# Returns 1 when this call announced the change, 0 when it was already announced (or nothing to announce).
ANNOUNCE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == 'open' then
  if current == 'open' then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    return 0
  end
elseif current ~= 'open' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
  'api_id', ARGV[3], 'state', ARGV[1], 'at', ARGV[4], 'worker', ARGV[5])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def announcing_tenants(client: Any) -> set[str]:
    """Tenants whose gateways ever announced a circuit change (where ``open_apis`` needs to look)."""
    return {_text(tenant) for tenant in client.smembers(TENANTS_KEY)}


def open_apis(client: Any, apis: Mapping[str, Iterable[str]]) -> set[str]:
    """Which of ``apis`` (tenant -> API ids) are announced ``open`` now. The state keys are the announced truth: an
    ``open`` nobody renews ends with its TTL, while the outbox holds only what the deliverer copied so far.

    One MGET per tenant: its state keys share the tenant's hash tag, so the call stays on one Redis Cluster slot.
    Raises redis.RedisError as the client does.
    """
    found: set[str] = set()
    for tenant, ids in sorted(apis.items()):
        api_ids = sorted(ids)
        if not api_ids:
            continue
        node = redis_client.node_for_key(client, stream_key(tenant))
        states = node.mget([state_key(tenant, api_id) for api_id in api_ids])
        found.update(api_id for api_id, state in zip(api_ids, states, strict=True) if state and _text(state) == OPEN)
    return found
