"""Through the real gateway (gunicorn, 2 workers) to am_usage_records: stored == emitted, no duplicates."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import requests
from django.db import connection
from django.db.models import Sum

from apimgmt import usage_buckets as contract
from apimgmt.models import ApiKey, Consumer, Tenant, UsageCopy, UsageRecord
from apimgmt.usage import UsageFlusher, flusher_redis
from tests.support import deployment as deployment_support
from tests.support.faults import RedisServer, redis_server
from tests.usage.helpers import ROOT, stored_total, wait_until, waiting_minutes

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class Traffic:
    """What the client saw: one response per request, by status."""

    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def send(self, base: str, path: str, key: str, count: int, pause: float = 0.0) -> None:
        with requests.Session() as session:
            for i in range(count):
                headers = {"X-API-Key": key} if i % 10 else {"X-API-Key": "ak_live_wrong"}  # some 401s
                try:
                    status = session.get(f"{base}{path}/items/{i}", headers=headers, timeout=10).status_code
                except requests.RequestException:
                    continue  # no response, no promise: the gateway may or may not have answered
                with self.lock:
                    self.statuses[status] += 1
                if pause:
                    time.sleep(pause)


@dataclass
class Deployment(deployment_support.Deployment):
    redis: RedisServer = field(default=None)  # type: ignore[assignment]


@pytest.fixture
def deployment(
    live_env: dict[str, str], acme: Tenant, bob_app: Consumer, tmp_path: Path, settings: object
) -> Iterator[Deployment]:
    settings.UPSTREAM_ALLOW_PRIVATE = True  # type: ignore[attr-defined]
    with redis_server(persistent=True) as server:
        env = {**live_env, "REDIS_URL": server.url}
        with deployment_support.deployed_gateway(env, acme, bob_app, tmp_path) as deployed:
            yield Deployment(deployed.base, deployed.env, deployed.api, deployed.key_id, deployed.key, redis=server)


def _flush_until(
    deployment: Deployment, expected: int, timeout: float = 20.0, flusher: UsageFlusher | None = None
) -> None:
    flusher = flusher or UsageFlusher(client=flusher_redis(deployment.redis.url), consumer="e2e")

    def done() -> bool:
        flusher.drain()
        return stored_total() >= expected

    wait_until(done, timeout, interval=0.3)
    time.sleep(0.5)  # anything late (a duplicate would show up now)
    flusher.drain()


def _assert_stored_equals_emitted(deployment: Deployment, traffic: Traffic) -> None:
    stored = Counter(
        {
            row["status_code"]: row["n"]
            for row in UsageRecord.objects.values("status_code").annotate(n=Sum("request_count"))
        }
    )
    assert stored == traffic.statuses
    assert UsageCopy.objects.count() < traffic.total / 5, "copies follow tenant-minutes, not requests"
    assert set(UsageRecord.objects.values_list("api_id", flat=True)) == {deployment.api.id}
    assert UsageRecord.objects.filter(status_code=200).values_list("key_id", flat=True).distinct().get() == (
        deployment.key_id
    )


def test_every_request_is_stored_once_when_nothing_goes_wrong(deployment: Deployment) -> None:
    traffic = Traffic()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 300)

    _flush_until(deployment, traffic.total)

    assert traffic.statuses[200] == 270 and traffic.statuses[401] == 30
    _assert_stored_equals_emitted(deployment, traffic)
    assert wait_until(lambda: ApiKey.objects.get(key_id=deployment.key_id).last_used_at is not None, 5)


def test_redis_paused_for_five_seconds_mid_run_loses_and_duplicates_nothing(deployment: Deployment) -> None:
    traffic = Traffic()
    sender = threading.Thread(target=traffic.send, args=(deployment.base, "/echo/v1", deployment.key, 400, 0.02))
    sender.start()
    time.sleep(1.5)
    deployment.redis.pause()
    time.sleep(5)
    deployment.redis.resume()
    sender.join(timeout=120)

    _flush_until(deployment, traffic.total, timeout=30)

    assert traffic.total >= 390
    _assert_stored_equals_emitted(deployment, traffic)


def test_redis_restarted_mid_run_events_are_spooled_and_replayed(deployment: Deployment, tmp_path: Path) -> None:
    traffic = Traffic()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 100)
    deployment.redis.stop()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 100)  # Redis is down: spooled
    time.sleep(1.5)  # the workers' background flush (every second) finds Redis gone
    spooled = list((tmp_path / "spool").glob("usage-*.json"))
    deployment.redis.start()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 100)

    _flush_until(deployment, traffic.total, timeout=30)

    assert spooled, "events written while Redis was down went to the spool"
    _assert_stored_equals_emitted(deployment, traffic)


def _dsn() -> str:
    p = connection.settings_dict
    return f"host={p['HOST'] or '127.0.0.1'} port={p['PORT'] or 5432} user={p['USER'] or 'postgres'} dbname={p['NAME']}"


def _counted_in_redis(client: object) -> int:
    """Requests in the tenant's minute buckets in Redis (what the gateways sent, not yet copied)."""
    total = 0
    for key in client.scan_iter(f"{contract.tag('acme')}:m:*"):  # type: ignore[attr-defined]
        total += sum(contract.decode(v.decode())[0] for v in client.hvals(key))  # type: ignore[attr-defined]
    return total


def test_flusher_database_connection_killed_mid_batch(deployment: Deployment) -> None:
    traffic = Traffic()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 200)
    assert wait_until(lambda: _counted_in_redis(deployment.redis.client()) >= traffic.total, 10)
    flusher = UsageFlusher(
        client=flusher_redis(deployment.redis.url), consumer="f", batch_size=1, lease=timedelta(seconds=0.5)
    )

    def kill_my_backend() -> None:
        pid = connection.connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(_dsn(), autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", [pid])

    flusher.before_commit = kill_my_backend
    with pytest.raises(Exception, match=r"(?i)terminat|closed|connection"):
        flusher.drain()
    connection.close()
    assert stored_total() == 0 and waiting_minutes(deployment.redis.client()) >= 1

    flusher.before_commit = None  # the same flusher goes on with a new connection, once the claim's lease is over
    time.sleep(0.6)
    _flush_until(deployment, traffic.total, flusher=flusher)
    _assert_stored_equals_emitted(deployment, traffic)


def test_flusher_killed_between_commit_and_release_then_restarted(deployment: Deployment) -> None:
    traffic = Traffic()
    traffic.send(deployment.base, "/echo/v1", deployment.key, 200)
    assert wait_until(lambda: _counted_in_redis(deployment.redis.client()) >= traffic.total, 10)
    # The test seam: this flusher process exits (like SIGKILL, no cleanup) right after its first COMMIT.
    doomed = textwrap.dedent(
        """
        import os, django
        from datetime import timedelta
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
        django.setup()
        from django.conf import settings
        from apimgmt.usage import UsageFlusher, flusher_redis
        UsageFlusher(client=flusher_redis(settings.REDIS_URL), consumer="doomed", batch_size=1,
                     lease=timedelta(seconds=1), after_commit=lambda: os._exit(17)).drain()
        """
    )
    env = {**os.environ, **deployment.env}
    assert subprocess.run([sys.executable, "-c", doomed], cwd=ROOT, env=env).returncode == 17
    assert 0 < stored_total() <= traffic.total and waiting_minutes(deployment.redis.client()) >= 1

    time.sleep(1.1)
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "flush_usage", "--claim-idle-seconds", "1"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    _assert_stored_equals_emitted(deployment, traffic)
    assert waiting_minutes(deployment.redis.client()) == 0
