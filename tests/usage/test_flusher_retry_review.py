"""Review of the flusher's retry of its own failed batches (UsageFlusher._unfinished): when the retry meets another
flusher that took the same claims over after their lease, every request is still counted exactly once.

Real Redis and PostgreSQL; the two flushers share the test's database connection and run one after the other.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from django.conf import settings

from apimgmt.models import Tenant
from apimgmt.usage import UsageFlusher, flusher_redis
from tests.usage.helpers import emit, emitted_counts, mixed_events, stored_counts, stored_total, waiting_minutes

LEASE = timedelta(seconds=0.2)


def _flusher(name: str) -> UsageFlusher:
    return UsageFlusher(client=flusher_redis(settings.REDIS_URL, block_ms=100), consumer=name, lease=LEASE)


def _fail() -> None:
    raise RuntimeError("database went away")


@pytest.mark.parametrize("fails", ["before_commit", "after_commit"])
def test_a_retry_after_another_flusher_took_the_batch_over_counts_nothing_twice(
    redis_client: redis.Redis, acme: Tenant, fails: str
) -> None:
    events = mixed_events(50, ts=time.time() - 120)
    emit(redis_client, events)
    first, second = _flusher("first"), _flusher("second")
    setattr(first, fails, _fail)
    with pytest.raises(RuntimeError):
        first.flush_once()
    assert first._unfinished, "the failed batch is kept for this flusher's next pass"

    time.sleep(LEASE.total_seconds() + 0.1)  # the first one is slow to come back: its lease ends
    taken = second.flush_once()
    assert taken.requests + taken.skipped * 50 == 50
    setattr(first, fails, None)
    retried = first.flush_once()  # its retry now meets the claims the second one copied and released

    assert (retried.requests, retried.minutes) == (0, 0)
    assert stored_counts() == emitted_counts(events) and stored_total() == 50
    assert waiting_minutes(redis_client) == 0 and not first._unfinished


def test_two_flushers_both_failing_on_the_same_claims_then_retrying_count_them_once(
    redis_client: redis.Redis, acme: Tenant
) -> None:
    events = mixed_events(40, ts=time.time() - 120)
    emit(redis_client, events)
    first, second = _flusher("first"), _flusher("second")
    first.before_commit = second.before_commit = _fail
    with pytest.raises(RuntimeError):
        first.flush_once()
    time.sleep(LEASE.total_seconds() + 0.1)
    with pytest.raises(RuntimeError):
        second.flush_once()  # took the first one's claims over, and failed too
    assert first._unfinished and second._unfinished

    first.before_commit = second.before_commit = None
    done = [first.flush_once(), second.flush_once(), first.flush_once(), second.flush_once()]

    assert sum(s.requests for s in done) == 40
    assert stored_counts() == emitted_counts(events)
    assert waiting_minutes(redis_client) == 0 and not first._unfinished and not second._unfinished
