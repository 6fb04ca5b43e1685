"""Stored == counted, with no duplicates, when the flusher, its database connection or Redis fail mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import redis
import requests
from django.db import DatabaseError, connection

from apimgmt.models import Tenant, UsageCopy
from apimgmt.usage import UsageFlusher, flusher_redis
from tests.support.faults import RedisServer, redis_server
from tests.usage.helpers import (
    ROOT,
    Event,
    emit,
    emitted_counts,
    make_event,
    manage,
    mixed_events,
    stored_counts,
    stored_total,
    wait_until,
    waiting_minutes,
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
        *extra,
        log_path=tmp_path / "flusher.log",
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def _dsn() -> str:
    params = connection.settings_dict
    return f"host={params['HOST'] or '127.0.0.1'} port={params['PORT'] or 5432} user={params['USER'] or 'postgres'} dbname={params['NAME']}"


def _spread(n: int, minutes: int, *, ago: int = 120) -> list[Event]:
    """n requests over ``minutes`` closed minutes (so a following flusher copies them at once)."""
    start = time.time() - ago - minutes * 60
    return [{**event, "now": start + (i % minutes) * 60 + 1} for i, event in enumerate(mixed_events(n))]


def test_flusher_killed_between_commit_and_release_counts_nothing_twice(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    events = _spread(400, 8)
    emit(private_redis.client(), events)
    # A real flusher process that dies (os._exit, like SIGKILL) right after its first COMMIT, before the release.
    doomed = textwrap.dedent(
        """
        import os, django
        from datetime import timedelta
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
        django.setup()
        from django.conf import settings
        from apimgmt.usage import UsageFlusher, flusher_redis
        flusher = UsageFlusher(client=flusher_redis(settings.REDIS_URL), consumer="doomed", batch_size=3,
                               lease=timedelta(seconds=1), after_commit=lambda: os._exit(17))
        flusher.drain()
        """
    )
    result = subprocess.run([sys.executable, "-c", doomed], cwd=ROOT, env={**os.environ, **flusher_env})
    assert result.returncode == 17
    assert stored_total() == 150, "the first three minutes were committed"
    assert waiting_minutes(private_redis.client()) == 8, "…but never released"

    time.sleep(1.2)  # the dead flusher's claims can be taken over after their lease
    out = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "flush_usage", "--claim-idle-seconds", "1"],
        cwd=ROOT,
        env={**os.environ, **flusher_env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert "counted 250 requests" in out and "3 minutes copied before, skipped" in out
    assert stored_counts() == emitted_counts(events)
    assert waiting_minutes(private_redis.client()) == 0


def test_database_connection_killed_mid_batch_loses_and_duplicates_nothing(
    private_redis: RedisServer, acme: Tenant
) -> None:
    events = _spread(200, 4)
    emit(private_redis.client(), events)
    flusher = UsageFlusher(
        client=flusher_redis(private_redis.url), consumer="f1", batch_size=2, lease=timedelta(seconds=0.5)
    )

    def kill_my_backend() -> None:
        # The batch's rows are written but not committed: the connection dies under it.
        pid = connection.connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(_dsn(), autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", [pid])

    flusher.before_commit = kill_my_backend
    with pytest.raises(Exception) as failure:
        flusher.drain()
    assert "terminat" in str(failure.value).lower() or "closed" in str(failure.value).lower()
    connection.close()
    assert stored_total() == 0
    assert waiting_minutes(private_redis.client()) == 4

    flusher.before_commit = None
    time.sleep(0.6)
    flusher.drain()
    assert stored_counts() == emitted_counts(events)


def test_a_flusher_retries_its_own_killed_batch_at_once_not_after_the_lease(
    private_redis: RedisServer, acme: Tenant
) -> None:
    events = _spread(120, 3)
    emit(private_redis.client(), events)
    flusher = UsageFlusher(client=flusher_redis(private_redis.url), consumer="f1", lease=timedelta(seconds=60))
    killed: list[int] = []

    def kill_my_backend_once() -> None:
        if not killed:
            killed.append(connection.connection.info.backend_pid)  # type: ignore[union-attr]
            with psycopg.connect(_dsn(), autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", [killed[0]])

    flusher.before_commit = kill_my_backend_once
    with pytest.raises((DatabaseError, psycopg.Error)):
        flusher.drain()
    connection.close()
    assert stored_total() == 0
    # Straight away, with the claims' lease still 60 s away: the same flusher copies them, once.
    flusher.drain()
    assert stored_counts() == emitted_counts(events)
    flusher.drain()
    assert stored_counts() == emitted_counts(events)


def test_follow_survives_its_database_connection_being_killed_repeatedly(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    # Enough small transactions (one minute each) that the flush outlasts several kills even on an idle machine.
    events = _spread(6000, 600)
    emit(private_redis.client(), events)
    proc = _follow(flusher_env, tmp_path, "--batch-size", "1")
    kills = 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        my_pid = cursor.fetchone()[0]
    try:
        with psycopg.connect(_dsn(), autocommit=True) as killer:
            # Six kills that land (each while the flusher holds a connection), half a second or more apart so that
            # it makes progress in between; then it must finish on its own. (Killing without pause until the end,
            # as this test once did, mostly measured how slowly a flusher progresses under constant kills.)
            deadline = time.monotonic() + 60
            while kills < 6 and stored_total() < len(events) and time.monotonic() < deadline:
                row = killer.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    " AND pid <> %s",
                    [my_pid],
                ).fetchone()
                landed = int(row[0]) if row else 0
                kills += landed
                time.sleep(0.5 if landed else 0.1)
        # A claim whose transaction was killed is retried by the flusher itself on its next round, not after its
        # lease (60 s) ends: the rest takes seconds.
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
    # One minute per transaction, so that copying takes seconds and the pause surely lands mid-run.
    before, after = _spread(6000, 600), _spread(500, 5)
    emit(client, before)
    proc = _follow(flusher_env, tmp_path, "--batch-size", "1")
    try:
        assert wait_until(lambda: stored_total() > 0, 15)
        private_redis.pause()
        stored_when_paused = stored_total()
        time.sleep(5)
        private_redis.resume()
        assert proc.poll() is None
        assert stored_when_paused < len(before), "the pause came mid-run"
        emit(client, after)  # late requests of minutes that may be copied already
        assert wait_until(lambda: stored_total() >= len(before) + len(after), 60)
    finally:
        assert _stop(proc) == 0
    assert stored_counts() == emitted_counts(before + after)
    assert waiting_minutes(client) == 0
    assert "usage flush failed, retrying" in (tmp_path / "flusher.log").read_text(), "the flusher noticed the pause"


def test_redis_restarted_with_persistence_loses_nothing(live_env: dict[str, str], acme: Tenant, tmp_path: Path) -> None:
    with redis_server(persistent=True) as server:
        env = {**live_env, "REDIS_URL": server.url}
        first, second = _spread(6000, 600), _spread(300, 3)
        emit(server.client(), first)
        proc = _follow(env, tmp_path, "--batch-size", "1", "--claim-idle-seconds", "1")
        try:
            assert wait_until(lambda: stored_total() > 0, 15)
            server.restart()  # mid-run: some minutes claimed, some not yet
            assert stored_total() < len(first), "the restart came mid-run"
            emit(server.client(), second)
            assert wait_until(lambda: stored_total() >= len(first) + len(second), 60)
        finally:
            assert _stop(proc) == 0
        assert stored_counts() == emitted_counts(first + second)


def test_redis_restarted_empty_the_flusher_goes_on(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    first, second = _spread(100, 2), _spread(100, 2)
    emit(private_redis.client(), first)
    proc = _follow(flusher_env, tmp_path)
    try:
        assert wait_until(lambda: stored_total() == 100, 15)
        private_redis.restart()  # no persistence: buckets, index and markers are gone
        emit(private_redis.client(), second)
        assert wait_until(lambda: stored_total() == 200, 20)
    finally:
        assert _stop(proc) == 0
    assert stored_counts() == emitted_counts(first + second)


def test_follow_stops_cleanly_on_sigterm(flusher_env: dict[str, str], tmp_path: Path) -> None:
    proc = _follow(flusher_env, tmp_path)
    log_file = tmp_path / "flusher.log"
    # Its handlers are in place once it says so (start-up takes seconds on a loaded machine).
    assert wait_until(lambda: log_file.exists() and "usage flusher started" in log_file.read_text(), 30)
    time.sleep(0.5)
    started = time.monotonic()
    assert _stop(proc) == 0
    assert time.monotonic() - started < 3
    log = (tmp_path / "flusher.log").read_text()
    assert "usage flusher stopped" in log


def test_two_flushers_racing_on_the_same_minutes_count_everything_once(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    # A lease of zero: every claim of one flusher is at once takeable by the other, so both copy the same
    # minutes at the same time, and only the copy token's primary key keeps them from counting twice.
    events = _spread(3000, 300)
    racing = ("--claim-idle-seconds", "0", "--batch-size", "2", "--block-ms", "50")
    one = _follow(flusher_env, tmp_path, "--consumer", "one", *racing)
    two = _follow(flusher_env, tmp_path, "--consumer", "two", *racing)
    try:
        for i in range(0, len(events), 300):
            emit(private_redis.client(), events[i : i + 300])
            time.sleep(0.05)
        assert wait_until(lambda: stored_total() >= len(events) and not waiting_minutes(private_redis.client()), 60)
        time.sleep(1)  # anything late (a double count would show now)
    finally:
        assert _stop(one) == 0 and _stop(two) == 0
    assert stored_counts() == emitted_counts(events)
    assert UsageCopy.objects.count() >= 300


def test_redis_client_of_the_flusher_waits_longer_than_its_block() -> None:
    client = flusher_redis("redis://127.0.0.1:1/0", block_ms=1000)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] > 1.0
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_follow_serves_its_lag_backlog_and_progress_as_metrics(
    flusher_env: dict[str, str], private_redis: RedisServer, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.servers import free_port

    port = free_port()
    events = _spread(120, 3)
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
            return (
                s.get("apimgmt_usage_flusher_requests_total['counted']") == 120
                and s.get("apimgmt_usage_flusher_lag_seconds[]") == 0
                and s.get("apimgmt_usage_flusher_backlog_minutes[]") == 0
            )

        assert wait_until(settled, 15)
        assert samples()["apimgmt_usage_flusher_last_success_timestamp_seconds[]"] > time.time() - 10
    finally:
        assert _stop(proc) == 0


def test_lag_counts_from_when_the_oldest_waiting_minute_closed(private_redis: RedisServer, acme: Tenant) -> None:
    flusher = UsageFlusher(client=flusher_redis(private_redis.url))
    assert flusher.lag_seconds() == 0
    emit(private_redis.client(), [make_event(ts=time.time() - 600)])
    assert 470 <= flusher.lag_seconds() <= 600
    assert flusher.backlog_minutes() == 1
    flusher.drain()
    assert flusher.lag_seconds() == 0 and flusher.backlog_minutes() == 0
