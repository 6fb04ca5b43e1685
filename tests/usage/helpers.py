"""Helpers for usage tests: traffic counted the way the gateway counts it, and totals to compare."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from django.db.models import Sum

from apimgmt import usage_buckets as contract
from apimgmt.models import UsageRecord
from gateway.usage import UsageRecorder
from tests.support.secrets_scan import SERVER_LOG_DIR, register_log

ROOT = Path(__file__).resolve().parents[2]

Dimension = tuple[str, str, str, str, int]
Event = dict[str, Any]


def make_event(
    *,
    tenant: str = "acme",
    api: str = "api_users",
    consumer: str = "con_bob",
    key: str = "key_bob",
    status: int = 200,
    ts: float | None = None,
    latency_ms: float = 12.5,
    upstream_ms: float | None = 5.0,
) -> Event:
    """One finished request as the gateway's recorder sees it."""
    return {
        "tenant": tenant,
        "api": api,
        "consumer": consumer,
        "key": key,
        "status": status,
        "bytes_in": 10,
        "bytes_out": 100,
        "latency_s": latency_ms / 1000,
        "upstream_s": None if upstream_ms is None else upstream_ms / 1000,
        "now": time.time() if ts is None else ts,
    }


def mixed_events(n: int, **overrides: object) -> list[Event]:
    """n requests over two APIs, two keys and a few status codes."""
    statuses = (200, 200, 200, 404, 429, 502)
    events = []
    for i in range(n):
        fields: dict[str, object] = {
            "api": ("api_users", "api_orders")[i % 2],
            "key": ("key_bob", "key_bob2")[(i // 2) % 2],
            "status": statuses[i % len(statuses)],
            **overrides,
        }
        events.append(make_event(**fields))  # type: ignore[arg-type]
    return events


# Every recorder's spool lives under one directory, removed when the test process exits.
_SPOOLS = Path(tempfile.mkdtemp(prefix="usage-spools-"))
atexit.register(shutil.rmtree, _SPOOLS, True)


def recorder() -> UsageRecorder:
    return UsageRecorder(tempfile.mkdtemp(prefix="spool-", dir=_SPOOLS))


def emit(client: redis.Redis, events: list[Event], *, using: UsageRecorder | None = None) -> None:
    """Count the requests with a gateway recorder and send its buckets to ``client`` (one flush)."""
    worker = using or recorder()
    for event in events:
        worker.record(**event)
    worker.flush(client)
    assert not worker.unresolved and not worker.unsent, "the buckets reached Redis"


def emitted_counts(events: list[Event]) -> Counter[Dimension]:
    return Counter((e["tenant"], e["api"], e["consumer"], e["key"], int(e["status"])) for e in events)


def stored_counts() -> Counter[Dimension]:
    counts: Counter[Dimension] = Counter()
    rows = UsageRecord.objects.values("tenant_id", "api_id", "consumer_id", "key_id", "status_code").annotate(
        n=Sum("request_count")
    )
    for row in rows:
        counts[(row["tenant_id"], row["api_id"], row["consumer_id"], row["key_id"], row["status_code"])] += row["n"]
    return counts


def stored_total() -> int:
    return int(UsageRecord.objects.aggregate(n=Sum("request_count"))["n"] or 0)


def waiting_minutes(client: redis.Redis) -> int:
    """Tenant-minutes in Redis not yet copied (dirty or claimed)."""
    total = 0
    for tenant in client.smembers(contract.TENANTS_KEY):
        name = tenant.decode()
        total += int(client.zcard(contract.dirty_key(name))) + int(client.zcard(contract.claims_key(name)))
    return total


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def manage(env: dict[str, str], *args: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``manage.py <args>`` as a subprocess with the given environment (stdout+stderr to log_path)."""
    if log_path is None:
        log_path = SERVER_LOG_DIR / f"manage-{uuid.uuid4().hex[:8]}.log"
    else:
        register_log(log_path)  # scanned for leaked secrets at the end of the session
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
