"""A resolver that does not answer (a DNS outage) holds an upstream connection no longer than the connect timeout.

Each check runs in a child process with a mount namespace of its own, where /etc/resolv.conf names a DNS server on
loopback that reads queries and never answers (glibc would wait its own timeout per attempt: 6 s here). The rest of
the machine keeps its resolver.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import os, sys, time
    if sys.argv[1] == "gevent":
        from gevent import monkey
        monkey.patch_all()
    import django
    django.setup()
    from gateway import http1
    started = time.monotonic()
    host, _, port = sys.argv[2].partition(":")
    try:
        http1.connect_upstream(host, int(port or 80), float(sys.argv[3]))
        print("connected 0", flush=True)
    except http1.ConnectFailed as exc:
        print("timed_out" if exc.timed_out else "refused", round(time.monotonic() - started, 2), flush=True)
    # Lookups still waiting on the silent resolver would hold the interpreter's exit (thread pools are joined).
    os._exit(0)
    """
)


@pytest.fixture
def silent_resolver(tmp_path: Path) -> Iterator[Path]:
    """A resolv.conf whose only nameserver swallows every query (UDP and TCP), with glibc's retries set to 3 s x 2."""
    address = f"127.{random.randint(1, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp.bind((address, 53))
    tcp.bind((address, 53))
    tcp.listen(16)
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {address}\noptions timeout:3 attempts:2\n")
    try:
        yield conf
    finally:
        udp.close()
        tcp.close()


def _in_namespace(conf: Path, *args: object, child: str = CHILD) -> tuple[str, float]:
    """Run ``child`` with ``args`` where /etc/resolv.conf is ``conf``: what connect_upstream did, and how long it
    took (its last line of output)."""
    script = f'mount --bind {conf} /etc/resolv.conf && exec {sys.executable} -c "$CHILD" ' + " ".join(map(str, args))
    env = {
        **os.environ,
        "CHILD": child,
        "DJANGO_SETTINGS_MODULE": "apimgmt.settings",
        "DEBUG": "1",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "PYTHONPATH": str(ROOT),
    }
    try:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child did not finish in 60 s; it printed {exc.stdout!r}, {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    outcome, _, seconds = done.stdout.strip().splitlines()[-1].partition(" ")
    return outcome, float(seconds)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_a_silent_resolver_fails_the_connection_within_the_connect_timeout(silent_resolver: Path, mode: str) -> None:
    outcome, seconds = _in_namespace(silent_resolver, mode, "upstream.example.test", 1.0)
    # glibc alone would wait 3 s x 2 attempts before giving up; the connect timeout is 1 s.
    assert outcome == "timed_out"
    assert seconds < 2.5


def test_an_address_needs_no_resolver(silent_resolver: Path) -> None:
    # Nothing listens on this port: refused at once, the silent resolver never asked.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome, seconds = _in_namespace(silent_resolver, "threads", f"127.0.0.1:{port}", 5.0)
    assert outcome == "refused" and seconds < 1.0


# Many silent names, then one in /etc/hosts (resolved without asking DNS): the lookups that timed out must not hold
# every lookup thread (gateway/resolver.py), or the good name would wait behind them.
STARVING = textwrap.dedent(
    """
    import os, socket, sys, time
    if sys.argv[1] == "gevent":
        from gevent import monkey
        monkey.patch_all()
    import django
    django.setup()
    from gateway import http1
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # Requests to an API whose upstream's name nobody answers: each gives up after its 0.3 s connect timeout.
    for i in range(int(sys.argv[2])):
        try:
            http1.connect_upstream(f"down-{i}.example.test", 80, 0.3)
        except http1.ConnectFailed:
            pass
    print("silent names tried", flush=True)
    # Then a request to another API, whose upstream's name is in /etc/hosts.
    started = time.monotonic()
    try:
        http1.connect_upstream("localhost", port, 1.0).close()
        print("connected", round(time.monotonic() - started, 2), flush=True)
    except http1.ConnectFailed as exc:
        print("timed_out" if exc.timed_out else "refused", round(time.monotonic() - started, 2), flush=True)
    os._exit(0)
    """
)


@pytest.mark.parametrize(("mode", "silent_names"), [("threads", 8), ("gevent", 16)])
def test_lookups_that_timed_out_do_not_starve_other_upstreams(
    silent_resolver: Path, mode: str, silent_names: int
) -> None:
    outcome, seconds = _in_namespace(silent_resolver, mode, silent_names, child=STARVING)
    assert (outcome, seconds < 0.5) == ("connected", True)


def test_a_lookup_over_before_its_callback_is_registered_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lookup can be over before its completion callback is registered (a name in /etc/hosts, a fast resolver):
    # the callback then runs at once, in the caller. It once did so while the caller held the lookups' lock, which
    # the callback takes too: that request, and every later lookup, hung for good. Here every lookup is over at once.
    from gateway import resolver

    class AtOnce(concurrent.futures.Executor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(fn(*args, **kwargs))
            return future

    lookups = resolver._current()
    monkeypatch.setattr(lookups, "threads", AtOnce())
    done = threading.Event()

    def resolve_twice() -> None:
        for _ in range(2):
            assert resolver.resolve("localhost", 80, 2.0)
        done.set()

    threading.Thread(target=resolve_twice, daemon=True).start()
    assert done.wait(10), "a lookup that was over at once hung"
    assert lookups.pending == {}  # over and forgotten: the next lookup asks again
