"""A receiver that answers a byte at a time gets WEBHOOK_TIMEOUT_SECONDS for its whole answer, not per byte.

Without a deadline for the whole attempt, one tenant's receiver trickling its headers (each byte well within the
read timeout) would hold a deliverer thread for as long as it likes, and with it the deliverer's round: every
tenant's webhooks would stop behind it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from apimgmt import services, webhooks
from apimgmt.models import WebhookDelivery

TRICKLE_SECONDS = 15.0


@contextmanager
def trickling_receiver() -> Iterator[str]:
    """An HTTP receiver on loopback that reads the request, then sends its answer's headers one byte every 0.3 s."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                ends = time.monotonic() + TRICKLE_SECONDS
                try:
                    while time.monotonic() < ends and not stop.is_set():
                        time.sleep(0.3)
                        conn.sendall(b"a")
                    conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass  # the deliverer hung up: what the test wants

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_a_trickling_receiver_is_cut_off_at_the_timeout(settings) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 1.0
    with trickling_receiver() as url:
        started = time.monotonic()
        result = webhooks.post(url, {}, b"{}", timeout=1.0)
        took = time.monotonic() - started
    assert not result.ok and result.status_code is None
    assert "no complete answer within 1 s" in result.error
    assert took < 5.0  # 1 s and room for a loaded machine; the receiver would go on for 15 s


def test_a_deliverer_round_is_not_held_by_a_trickling_receiver(acme, alice, bob_key, settings) -> None:
    settings.WEBHOOK_TIMEOUT_SECONDS = 1.0
    with trickling_receiver() as url:
        endpoint, _secret = webhooks.webhook_endpoint_create(tenant=acme, url=url, actor=alice)
        services.api_key_revoke(key=bob_key[0], actor=alice)
        deliverer = webhooks.Deliverer(batch_size=10, concurrency=2)
        try:
            started = time.monotonic()
            stats = deliverer.run_once()
            took = time.monotonic() - started
        finally:
            deliverer.close()
    assert stats.retried == 1 and stats.succeeded == 0
    assert took < 6.0
    delivery = WebhookDelivery.objects.get(endpoint=endpoint)
    assert delivery.status == WebhookDelivery.Status.PENDING and delivery.attempts == 1
    assert delivery.response_code is None and "no complete answer within 1 s" in delivery.last_error
