"""Events and webhooks: loopback receivers are allowed (WEBHOOK_ALLOW_PRIVATE) unless a test says otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from apimgmt.models import Event
from tests.api.conftest import client_for  # noqa: F401  (a fixture these tests use too)
from tests.support.webhook_receiver import Receiver, webhook_receiver

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _webhook_settings(settings: Any) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.WEBHOOK_TIMEOUT_SECONDS = 2.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


def event_types(tenant_id: str = "acme") -> list[str]:
    """The tenant's events, oldest first."""
    return list(
        Event.objects.filter(tenant_id=tenant_id).order_by("occurred_at", "id").values_list("event_type", flat=True)
    )


@contextmanager
def deliver_events(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``manage.py deliver_events <args>`` as a real process on this test's (committed) database; its log is
    scanned for secrets like every server's."""
    from tests.support.secrets_scan import SERVER_LOG_DIR

    log_path = SERVER_LOG_DIR / f"deliver-events-{os.getpid()}-{time.monotonic_ns()}.log"
    out = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "deliver_events", *args],
        cwd=ROOT,
        env={**os.environ, "WEBHOOK_ALLOW_PRIVATE": "1", "WEBHOOK_TIMEOUT_SECONDS": "30", **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()
