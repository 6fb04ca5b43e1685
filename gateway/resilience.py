"""Per-worker resilience state: weighted round-robin with passive health, circuit breakers, total deadlines.

All of it lives in one worker's memory (no coordination between workers): each worker ejects a dead
target and opens its breaker on its own evidence. With N workers an upstream sees at most N half-open
probes per recovery period, and a breaker opens after ``threshold`` failures seen by one worker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from gateway import metrics
from gateway.routing import Target

# How long a target that failed is skipped by the balancer.
TARGET_COOLOFF_SECONDS = 10.0


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

    def __init__(self, api_id: str, threshold: int, recovery_timeout: float) -> None:
        self.api_id = api_id
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
            if self.state != "closed":
                self.state = "closed"
                self.probe_in_flight = False
                metrics.circuit_open.labels(self.api_id).set(0)

    def failure(self) -> None:
        with self.lock:
            self.failures += 1
            if self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold):
                self.state = "open"
                self.opened_at = time.monotonic()
                self.probe_in_flight = False
                metrics.circuit_open.labels(self.api_id).set(1)


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
