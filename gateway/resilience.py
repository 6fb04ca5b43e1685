"""Per-worker resilience state: weighted round-robin with passive health, circuit breakers, total deadlines.

All of it lives in one worker's memory (no coordination between workers): each worker ejects a dead
target and opens its breaker on its own evidence. With N workers an upstream sees at most N half-open
probes per recovery period, and a breaker opens after ``threshold`` failures seen by one worker. A breaker that
changes state tells the event deliverer, off the request path and once across all workers and pods
(``CircuitAnnouncer``, apimgmt/circuit_events.py): that becomes ``circuit.opened`` / ``circuit.closed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from apimgmt import circuit_events
from gateway import metrics
from gateway.routing import Target

# How long a target that failed is skipped by the balancer.
TARGET_COOLOFF_SECONDS = 10.0
# State changes waiting for the announcer thread; past this (Redis down for long) the oldest are dropped.
ANNOUNCE_QUEUE_MAX = 1000

logger = logging.getLogger("gateway.circuit")


@dataclass
class _TargetState:
    target: Target
    current: int = 0
    down_until: float = 0.0


class Balancer:
    """Smooth weighted round-robin (as nginx does) over an API's targets, skipping ones in cool-off."""

    def __init__(self, targets: list[Target]) -> None:
        self.states = [_TargetState(t) for t in targets]
        self.total = sum(t.weight for t in targets)
        self.lock = threading.Lock()

    def pick(self, exclude: set[str] | None = None) -> Target:
        if len(self.states) == 1:
            return self.states[0].target
        now = time.monotonic()
        with self.lock:
            healthy = [s for s in self.states if s.down_until <= now and not (exclude and s.target.url in exclude)]
            if not healthy:
                # Everything is cooling off: try the one that failed longest ago rather than refusing.
                healthy = [min(self.states, key=lambda s: s.down_until)]
            total = sum(s.target.weight for s in healthy)
            best = healthy[0]
            for state in healthy:
                state.current += state.target.weight
                if state.current > best.current:
                    best = state
            best.current -= total
            return best.target

    def failed(self, target: Target) -> None:
        if len(self.states) == 1:
            return
        with self.lock:
            for state in self.states:
                if state.target.url == target.url:
                    state.down_until = time.monotonic() + TARGET_COOLOFF_SECONDS


class CircuitBreaker:
    """closed → (threshold consecutive failures) → open → (recovery timeout) → half-open: one probe decides."""

    def __init__(self, api_id: str, threshold: int, recovery_timeout: float, *, tenant_id: str = "") -> None:
        self.api_id = api_id
        self.tenant_id = tenant_id  # when not given, the announcer looks it up (once per API and worker)
        self.threshold = max(1, threshold)
        self.recovery_timeout = recovery_timeout
        self.failures = 0
        self.opened_at = 0.0
        self.state = "closed"
        self.probe_in_flight = False
        self.lock = threading.Lock()

    def allow(self) -> tuple[bool, float]:
        """(may this request go upstream?, seconds until a probe is allowed when not)."""
        if self.state == "closed":
            return True, 0.0
        with self.lock:
            now = time.monotonic()
            if self.state == "open":
                wait = self.opened_at + self.recovery_timeout - now
                if wait > 0:
                    return False, wait
                self.state = "half_open"
                self.probe_in_flight = False
            if self.probe_in_flight:
                return False, max(self.recovery_timeout / 10, 1.0)
            self.probe_in_flight = True
            return True, 0.0

    def release(self) -> None:
        """The request was refused before reaching the upstream: a half-open probe slot becomes free again."""
        if self.probe_in_flight:
            with self.lock:
                self.probe_in_flight = False

    def success(self) -> None:
        if self.state == "closed" and self.failures == 0:
            return
        with self.lock:
            self.failures = 0
            if self.state == "closed":
                return
            self.state = "closed"
            self.probe_in_flight = False
            metrics.circuit_open.labels(self.api_id).set(0)
        ANNOUNCER.changed(self, circuit_events.CLOSED)

    def failure(self) -> None:
        with self.lock:
            self.failures += 1
            if not (self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold)):
                return
            self.state = "open"
            self.opened_at = time.monotonic()
            self.probe_in_flight = False
            metrics.circuit_open.labels(self.api_id).set(1)
        ANNOUNCER.changed(self, circuit_events.OPEN)


@dataclass(frozen=True)
class _Change:
    tenant_id: str
    api_id: str
    state: str
    at: float  # epoch seconds
    recovery_timeout: float


class CircuitAnnouncer:
    """Tells the event deliverer that a breaker of this worker changed state, from a thread of its own.

    The request that trips the breaker only appends to a deque (state changes are rare: at most one per API and
    recovery period per worker). The thread runs ``circuit_events.ANNOUNCE_SCRIPT``, which lets exactly one of the
    workers seeing the same change append it to the tenant's stream; the gateway never writes PostgreSQL for it.
    When Redis is down the change is logged and dropped (a breaker that stays open re-announces on its next
    half-open failure).
    """

    def __init__(self) -> None:
        self.pending: deque[_Change] = deque(maxlen=ANNOUNCE_QUEUE_MAX)
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.running_pid = 0
        self.tenants: dict[str, str] = {}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def changed(self, breaker: CircuitBreaker, state: str) -> None:
        self.pending.append(_Change(breaker.tenant_id, breaker.api_id, state, time.time(), breaker.recovery_timeout))
        self.wake.set()
        if self.running_pid != os.getpid():  # not started yet, or forked into a new worker
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.running_pid == os.getpid():
                return
            self.running_pid = os.getpid()
            self.worker = f"{socket.gethostname()}:{os.getpid()}"
            threading.Thread(target=self._run, name="circuit-announcer", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            while self.pending:
                change = self.pending.popleft()
                try:
                    self.announce(change)
                except Exception:  # Redis or the database unwell: the breaker itself keeps working
                    logger.warning("circuit state change not announced", extra={"api_id": change.api_id}, exc_info=True)
            from django.db import connection

            connection.close()  # the thread's own connection (a tenant look-up) is not kept between rare changes

    def _tenant_of(self, change: _Change) -> str | None:
        if change.tenant_id:
            return change.tenant_id
        if change.api_id not in self.tenants:
            from apimgmt.models import Api

            tenant = Api.objects.filter(pk=change.api_id).values_list("tenant_id", flat=True).first()
            if tenant is None:
                return None
            self.tenants[change.api_id] = tenant
        return self.tenants[change.api_id]

    def announce(self, change: _Change) -> bool:
        """Run the announce script for one change; True when this worker's call was the one announced."""
        from apimgmt.redis_client import get_redis

        client = get_redis()
        tenant = self._tenant_of(change)
        if client is None or tenant is None:
            return False
        client.sadd(circuit_events.TENANTS_KEY, tenant)
        won = client.eval(
            circuit_events.ANNOUNCE_SCRIPT,
            2,
            circuit_events.state_key(tenant, change.api_id),
            circuit_events.stream_key(tenant),
            change.state,
            circuit_events.state_ttl(change.recovery_timeout),
            change.api_id,
            int(change.at * 1000),
            self.worker,
            circuit_events.STREAM_MAXLEN,
        )
        logger.info(
            "circuit %s in this worker%s",
            "opened" if change.state == circuit_events.OPEN else "closed",
            "; announced" if won else "; already announced by another worker",
            extra={"api_id": change.api_id, "tenant_id": tenant, "worker": self.worker},
        )
        return bool(won)


ANNOUNCER = CircuitAnnouncer()


@dataclass
class DeadlineWatch:
    """A deadline on some sockets: the reaper shuts them down (``how``) when it passes.

    One upstream exchange's total deadline (both directions cut), or a client's request body read (only reading
    is cut, so that the client still gets its answer).
    """

    deadline: float
    sockets: list[socket.socket] = field(default_factory=list)
    expired: bool = False
    how: int = socket.SHUT_RDWR

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class DeadlineReaper:
    """A per-worker thread that cuts upstream sockets whose exchange ran past its total deadline, and client
    sockets whose request body is too slow.

    Socket timeouts bound each read; only this bounds the sum (an upstream trickling a byte a second
    would otherwise hold a worker forever). Shutting a socket down wakes the blocked reader with EOF.
    """

    TICK_SECONDS = 0.02

    def __init__(self) -> None:
        self.by_id: dict[int, DeadlineWatch] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.running_pid = 0

    def watch(self, deadline: float, how: int = socket.SHUT_RDWR) -> DeadlineWatch:
        watch = DeadlineWatch(deadline, how=how)
        with self.lock:
            was_idle = not self.by_id
            self.by_id[id(watch)] = watch
        if was_idle:  # the thread only waits on the event while nothing is watched
            self.wake.set()
        # Thread.is_alive() takes a lock (a gevent lock in workers) on every request; the thread clears this
        # pid when its loop ends, and a forked child (another pid) starts its own.
        if self.running_pid != os.getpid():
            self._start()
        return watch

    def done(self, watch: DeadlineWatch) -> None:
        with self.lock:
            self.by_id.pop(id(watch), None)

    def _start(self) -> None:
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(target=self._run, name="deadline-reaper", daemon=True)
            self.thread.start()
            self.running_pid = os.getpid()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.running_pid = 0

    def _loop(self) -> None:
        while True:
            if not self.by_id:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            time.sleep(self.TICK_SECONDS)
            now = time.monotonic()
            with self.lock:
                due = [w for w in self.by_id.values() if w.deadline <= now and not w.expired]
            for watch in due:
                watch.expired = True
                for sock in watch.sockets:
                    with contextlib.suppress(OSError):
                        sock.shutdown(watch.how)
