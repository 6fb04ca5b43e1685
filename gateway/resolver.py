"""Upstream name lookups within the connect timeout, and without letting silent names take every lookup thread.

getaddrinfo blocks its thread for as long as the resolver takes: with DNS silent, glibc waits its timeout per
attempt (5 s x 2 by default), whatever the API's timeouts say. So a lookup runs on a thread of its own pool and
the request waits for it at most the connect timeout (TimeoutError then). The thread itself cannot be stopped: it
stays busy until glibc gives up. To keep silent names from holding every thread:

- one lookup per name and port at a time: concurrent requests for a name wait for the same lookup;
- a name whose lookup just timed out fails at once for FAILING_SECONDS, without a thread;
- the pool has LOOKUP_THREADS threads, apart from anything else in the worker (gevent's own resolver pool has 10
  and serves everything else that blocks).

So only more than LOOKUP_THREADS distinct silent names within glibc's timeout can delay other names' lookups; a
cluster whose DNS is that unwell wants a local caching resolver (NodeLocal DNSCache on Kubernetes). Addresses need
no lookup; successful answers are not kept (the name is resolved again for each new connection, as before).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
import sys
import threading
import time
from typing import Any

LOOKUP_THREADS = 32
FAILING_SECONDS = 5.0


class _Lookups:
    """This process's lookups in flight and names that failed, with the pool that runs them."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, int], Any] = {}
        self.failing: dict[tuple[str, int], float] = {}
        self.threads: concurrent.futures.ThreadPoolExecutor | None = None
        self.green: Any = None  # a gevent.threadpool.ThreadPool under gevent

    def start(self, key: tuple[str, int]) -> Any:
        """The lookup of ``key`` in flight (started now if there is none): a Future, or a gevent AsyncResult."""
        with self.lock:
            pending = self.pending.get(key)
            if pending is not None:
                return pending
            if _gevent_socket():
                from gevent import monkey
                from gevent.threadpool import ThreadPool

                if self.green is None:
                    self.green = ThreadPool(LOOKUP_THREADS)
                lookup = monkey.get_original("socket", "getaddrinfo")
                pending = self.green.spawn(lookup, key[0], key[1], 0, socket.SOCK_STREAM)
            else:
                if self.threads is None:
                    self.threads = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="resolve")
                pending = self.threads.submit(socket.getaddrinfo, key[0], key[1], 0, socket.SOCK_STREAM)
            self.pending[key] = pending
        # Outside the lock: a lookup that is already over calls back at once, and the callback takes the lock.
        if isinstance(pending, concurrent.futures.Future):
            pending.add_done_callback(lambda _done: self._forget(key, pending))
        else:
            pending.rawlink(lambda _done: self._forget(key, pending))
        return pending

    def _forget(self, key: tuple[str, int], pending: Any) -> None:
        with self.lock:
            if self.pending.get(key) is pending:
                del self.pending[key]


_lookups = _Lookups()


def _current() -> _Lookups:
    global _lookups
    if _lookups.pid != os.getpid():  # a forked child has none of its parent's threads
        _lookups = _Lookups()
    return _lookups


def _gevent_socket() -> bool:
    """Whether this process runs on gevent's socket module (the gateway's gunicorn worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def resolve(host: str, port: int, timeout: float | None) -> list[Any]:
    """getaddrinfo(host, port) for TCP, within ``timeout`` seconds (None: as long as it takes).

    Raises TimeoutError when the lookup takes longer (or timed out less than FAILING_SECONDS ago), and what
    getaddrinfo raises otherwise.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    lookups = _current()
    key = (host, port)
    failed_until = lookups.failing.get(key)
    if failed_until is not None:
        if time.monotonic() < failed_until:
            raise TimeoutError(f"resolving {host!r} timed out moments ago")
        lookups.failing.pop(key, None)
    pending = lookups.start(key)
    if isinstance(pending, concurrent.futures.Future):
        try:
            return list(pending.result(timeout))
        except concurrent.futures.TimeoutError as exc:
            lookups.failing[key] = time.monotonic() + FAILING_SECONDS
            raise TimeoutError(f"resolving {host!r} took longer than {timeout:g} s") from exc
    from gevent import Timeout  # a BaseException: caught by name

    try:
        return list(pending.get(timeout=timeout))
    except Timeout as exc:
        lookups.failing[key] = time.monotonic() + FAILING_SECONDS
        raise TimeoutError(f"resolving {host!r} took longer than {timeout:g} s") from exc
