"""Stored == emitted, with no duplicates, when the flusher, its database connection or Redis fail mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
import redis
import requests
from django.db import connection

from apimgmt.models import Tenant
from apimgmt.usage import UsageFlusher, flusher_redis
from tests.support.faults import RedisServer, redis_server
from tests.usage.helpers import (
    ROOT,
    emit,
    emitted_counts,
    manage,
    mixed_events,
    pending_count,
    stored_counts,
    stored_total,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def private_redis() -> RedisServer:
    with redis_server() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def flusher_env(live_env: dict[str, str], private_redis: RedisServer, acme: Tenant) -> dict[str, str]:
    return {**live_env, "REDIS_URL": private_redis.url}


def _follow(env: dict[str, str], tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    return manage(
        env,
        "flush_usage",
        "--follow",
        "--block-ms",
        "200",
        "--batch-size",
        "50",
        "--claim-idle-seconds",
        "1",
        *extra,
        log_path=tmp_path / "flusher.log",
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def _dsn() -> str:
    params = connection.settings_dict
    return f"host={params['HOST'] or '127.0.0.1'} port={params['PORT'] or 5432} user={params['USER'] or 'postgres'} dbname={params['NAME']}"


def test_flusher_killed_between_commit_and_acknowledge_counts_nothing_twice(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    events = mixed_events(400)
    emit(private_redis.client(), events)
    # A real flusher process that dies (os._exit, like SIGKILL) right after its first COMMIT, before XACK.
    doomed = textwrap.dedent(
        """
        import os, django
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
        django.setup()
        from django.conf import settings
        from apimgmt.usage import UsageFlusher, flusher_redis
        flusher = UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer="doomed",
                               batch_size=100, after_commit=lambda: os._exit(17))
        flusher.drain()
        """
    )
    result = subprocess.run([sys.executable, "-c", doomed], cwd=ROOT, env={**os.environ, **flusher_env})
    assert result.returncode == 17
    assert stored_total() == 100, "the first batch was committed"
    assert pending_count(private_redis.client()) == 100, "…but never acknowledged"

    time.sleep(1.2)  # the dead flusher's entries become reclaimable after --claim-idle-seconds
    out = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "flush_usage", "--claim-idle-seconds", "1"],
        cwd=ROOT,
        env={**os.environ, **flusher_env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert "counted 300 events" in out and "100 duplicates skipped" in out
    assert stored_counts() == emitted_counts(events)
    assert pending_count(private_redis.client()) == 0


def test_database_connection_killed_mid_batch_loses_and_duplicates_nothing(
    private_redis: RedisServer, acme: Tenant
) -> None:
    events = mixed_events(200)
    emit(private_redis.client(), events)
    flusher = UsageFlusher(client=flusher_redis(private_redis.url, block_ms=100), consumer="f1", batch_size=80)

    def kill_my_backend() -> None:
        # The batch's rows are written but not committed: the connection dies under it.
        pid = connection.connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(_dsn(), autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", [pid])

    flusher.before_commit = kill_my_backend
    with pytest.raises(Exception) as failure:
        flusher.flush_once()
    assert "terminat" in str(failure.value).lower() or "closed" in str(failure.value).lower()
    connection.close()
    assert stored_total() == 0
    assert pending_count(private_redis.client()) == 80

    flusher.before_commit = None
    flusher.drain()
    assert stored_counts() == emitted_counts(events)


def test_follow_survives_its_database_connection_being_killed_repeatedly(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    # Enough small batches that the flush outlasts several kills even on an idle machine.
    events = mixed_events(10000)
    emit(private_redis.client(), events)
    proc = _follow(flusher_env, tmp_path, "--batch-size", "10")
    kills = 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        my_pid = cursor.fetchone()[0]
    try:
        with psycopg.connect(_dsn(), autocommit=True) as killer:
            deadline = time.monotonic() + 30
            while stored_total() < len(events) and time.monotonic() < deadline:
                row = killer.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    " AND pid <> %s",
                    [my_pid],
                ).fetchone()
                kills += int(row[0]) if row else 0
                time.sleep(0.15)
        assert wait_until(lambda: stored_total() >= len(events), 30)
        assert proc.poll() is None, "the flusher keeps running"
    finally:
        assert _stop(proc) == 0
    assert kills >= 3
    assert stored_counts() == emitted_counts(events)
    assert "usage flush failed, retrying" in (tmp_path / "flusher.log").read_text()


def test_redis_paused_for_five_seconds_mid_run(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    client = private_redis.client()
    # Small batches so that draining takes seconds and the pause surely lands mid-run, however idle the machine.
    before, after = mixed_events(6000), mixed_events(500)
    emit(client, before)
    proc = _follow(flusher_env, tmp_path, "--batch-size", "10")
    try:
        assert wait_until(lambda: stored_total() > 0, 15)
        private_redis.pause()
        stored_when_paused = stored_total()
        time.sleep(5)
        private_redis.resume()
        assert proc.poll() is None
        assert stored_when_paused < len(before), "the pause came mid-run"
        emit(client, after)
        assert wait_until(lambda: stored_total() >= len(before) + len(after), 30)
    finally:
        assert _stop(proc) == 0
    assert stored_counts() == emitted_counts(before + after)
    assert pending_count(client) == 0
    assert "usage flush failed, retrying" in (tmp_path / "flusher.log").read_text(), "the flusher noticed the pause"


def test_redis_restarted_with_persistence_loses_nothing(live_env: dict[str, str], acme: Tenant, tmp_path: Path) -> None:
    with redis_server(persistent=True) as server:
        env = {**live_env, "REDIS_URL": server.url}
        # Small batches so that draining takes seconds and the restart surely lands mid-run.
        first, second = mixed_events(6000), mixed_events(300)
        emit(server.client(), first)
        proc = _follow(env, tmp_path, "--batch-size", "10")
        try:
            assert wait_until(lambda: stored_total() > 0, 15)
            server.restart()  # mid-run: some entries pending, some not yet read
            assert stored_total() < len(first), "the restart came mid-run"
            emit(server.client(), second)
            assert wait_until(lambda: stored_total() >= len(first) + len(second), 30)
        finally:
            assert _stop(proc) == 0
        assert stored_counts() == emitted_counts(first + second)


def test_redis_restarted_empty_gets_its_consumer_group_back(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    first, second = mixed_events(100), mixed_events(100)
    emit(private_redis.client(), first)
    proc = _follow(flusher_env, tmp_path)
    try:
        assert wait_until(lambda: stored_total() == 100, 15)
        private_redis.restart()  # no persistence: stream and group are gone
        emit(private_redis.client(), second)
        assert wait_until(lambda: stored_total() == 200, 20)
    finally:
        assert _stop(proc) == 0
    assert stored_counts() == emitted_counts(first + second)


def test_follow_stops_cleanly_on_sigterm(flusher_env: dict[str, str], tmp_path: Path) -> None:
    proc = _follow(flusher_env, tmp_path)
    time.sleep(2)
    started = time.monotonic()
    assert _stop(proc) == 0
    assert time.monotonic() - started < 3
    log = (tmp_path / "flusher.log").read_text()
    assert "usage flusher stopped" in log


def test_two_flushers_side_by_side_count_everything_once(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    events = mixed_events(2000)
    one, two = _follow(flusher_env, tmp_path, "--consumer", "one"), _follow(flusher_env, tmp_path, "--consumer", "two")
    try:
        for i in range(0, len(events), 200):
            emit(private_redis.client(), events[i : i + 200])
            time.sleep(0.05)
        assert wait_until(lambda: stored_total() >= len(events), 30)
    finally:
        assert _stop(one) == 0 and _stop(two) == 0
    assert stored_counts() == emitted_counts(events)


def test_redis_client_of_the_flusher_waits_longer_than_its_block() -> None:
    client = flusher_redis("redis://127.0.0.1:1/0", block_ms=1000)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] > 1.0
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_follow_serves_its_backlog_and_progress_as_metrics(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.servers import free_port

    port = free_port()
    events = mixed_events(120)
    emit(private_redis.client(), events)
    proc = _follow(flusher_env, tmp_path, "--metrics-port", str(port))

    def samples() -> dict[str, float]:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[sample.name + str(sorted(sample.labels.values()))] = sample.value
        return found

    try:
        assert wait_until(lambda: stored_total() == 120, 15)

        def settled() -> bool:
            try:
                s = samples()
            except requests.RequestException:
                return False
            return s.get("apimgmt_usage_flusher_events_total['counted']") == 120 and (
                s.get("apimgmt_usage_flusher_backlog_events[]") == 0
            )

        assert wait_until(settled, 15)
        assert samples()["apimgmt_usage_flusher_last_success_timestamp_seconds[]"] > time.time() - 10
    finally:
        assert _stop(proc) == 0
