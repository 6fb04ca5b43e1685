"""Review of 029fa49 (a name lookup bounded by the connect timeout): one upstream whose DNS is silent must not make
the connections of other upstreams, whose names resolve at once, fail.

As in test_dns_deadline: each check runs in a child process with a mount namespace of its own, where
/etc/resolv.conf names a DNS server on loopback that never answers (glibc waits 3 s x 2 per lookup). ``localhost``
is in /etc/hosts: it resolves without asking DNS at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.gateway.test_dns_deadline import ROOT, silent_resolver  # noqa: F401 - the fixture

CHILD = textwrap.dedent(
    """
    import socket, sys, time
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
    # Then a request to another API, whose upstream's name is in /etc/hosts.
    started = time.monotonic()
    try:
        http1.connect_upstream("localhost", port, 1.0).close()
        print("connected", round(time.monotonic() - started, 2))
    except http1.ConnectFailed as exc:
        print("timed_out" if exc.timed_out else "refused", round(time.monotonic() - started, 2))
    """
)


def _in_namespace(conf: Path, *args: object) -> tuple[str, float]:
    script = f'mount --bind {conf} /etc/resolv.conf && exec {sys.executable} -c "$CHILD" ' + " ".join(map(str, args))
    env = {
        **os.environ,
        "CHILD": CHILD,
        "DJANGO_SETTINGS_MODULE": "apimgmt.settings",
        "DEBUG": "1",
        "UPSTREAM_ALLOW_PRIVATE": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    outcome, _, seconds = done.stdout.strip().splitlines()[-1].partition(" ")
    return outcome, float(seconds)


def test_lookups_that_timed_out_do_not_starve_other_upstreams_without_gevent(silent_resolver: Path) -> None:  # noqa: F811
    outcome, seconds = _in_namespace(silent_resolver, "threads", 8)
    assert (outcome, seconds < 0.5) == ("connected", True)


def test_lookups_that_timed_out_do_not_starve_other_upstreams_under_gevent(silent_resolver: Path) -> None:  # noqa: F811
    outcome, seconds = _in_namespace(silent_resolver, "gevent", 16)
    assert (outcome, seconds < 0.5) == ("connected", True)
