"""Proxying: headers both ways, bodies, request ids, errors, timeouts, retries, balancing, circuit breaker."""

from __future__ import annotations

import time

import pytest

from apimgmt import services
from apimgmt import usage_buckets as contract
from apimgmt.models import ApiKey
from gateway.proxy import UNREACHABLE
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import (
    Answer,
    Received,
    answering,
    garbage,
    raw_upstream,
    read_request_head,
    recording_upstream,
    self_signed_certificate,
    stall,
    tls_answering,
)
from tests.support.servers import free_port


def _api(acme, bob_app, url, **options):
    api = publish(acme, url, **options)
    subscribe(bob_app, api)
    return api


def test_hop_by_hop_headers_are_dropped_both_ways(gateway, users_api, upstream, key):
    upstream.respond = lambda seen: Answer(
        headers=[
            ("Connection", "close, X-Upstream-Secret"),
            ("X-Upstream-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X"),
            ("Upgrade", "h2c"),
            ("X-Kept", "yes"),
        ],
    )
    response = gateway.get(
        "/api/users/v1/x",
        headers={
            "X-API-Key": key,
            "Connection": "keep-alive, X-Client-Secret",
            "X-Client-Secret": "c",
            "Keep-Alive": "300",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9v",
            "Proxy-Connection": "keep-alive",
            "Proxy": "http://evil",
            "Upgrade": "websocket",
            "X-Kept": "yes",
        },
    )
    assert response.status == 200
    seen = upstream.seen[0].headers
    for name in ("x-client-secret", "keep-alive", "te", "proxy-authorization", "proxy-connection", "proxy", "upgrade"):
        assert name not in seen, name
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"  # urllib3's own, not the client's
    assert seen["x-kept"] == "yes"
    names = {k.lower() for k, _ in response.headers}
    assert not names & {"connection", "x-upstream-secret", "keep-alive", "proxy-authenticate", "trailer", "upgrade"}
    assert response.header("X-Kept") == "yes"


def test_forwarded_headers_request_id_consumer_and_tenant_are_set(gateway, users_api, upstream, key, bob_app):
    response = gateway.get(
        "/api/users/v1/x?b=2&a=1&a=3",
        headers={
            "X-API-Key": key,
            "X-Forwarded-For": "6.6.6.6",
            "X-Consumer-ID": "spoofed",
            "X-Request-ID": "req-12345678",
        },
        remote_addr="10.1.2.3",
        host="gw.example.com",
    )
    seen = upstream.seen[0]
    assert seen.path == "/svc/x?b=2&a=1&a=3"
    assert seen.headers["x-forwarded-for"] == "10.1.2.3"  # the peer is not a trusted proxy
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-host"] == "gw.example.com"
    assert seen.headers["x-request-id"] == "req-12345678"
    assert seen.headers["x-consumer-id"] == bob_app.id
    assert seen.headers["x-tenant-id"] == "acme"
    assert response.header("X-Request-ID") == "req-12345678"
    generated = gateway.get("/api/users/v1/x", headers={"X-API-Key": key, "X-Request-ID": "bad id!"})
    assert generated.header("X-Request-ID") != "bad id!" and len(generated.header("X-Request-ID")) == 32
    assert upstream.seen[1].headers["x-request-id"] == generated.header("X-Request-ID")


def test_client_ip_comes_from_forwarded_for_only_through_trusted_proxies(settings_gateway, users_api, upstream, key):
    from tests.gateway.conftest import InProcessGateway

    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    gateway = InProcessGateway()
    gateway.get(
        "/api/users/v1/x", headers={"X-API-Key": key, "X-Forwarded-For": "1.2.3.4, 10.0.0.7"}, remote_addr="10.0.0.9"
    )
    assert upstream.seen[0].headers["x-forwarded-for"] == "1.2.3.4, 10.0.0.7, 10.0.0.9"


def test_status_headers_several_set_cookies_and_body_come_back_exactly(gateway, users_api, upstream, key):
    upstream.respond = lambda seen: Answer(
        status=201,
        headers=[
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; HttpOnly"),
            ("Content-Encoding", "gzip"),
        ],
        body=b"\x1f\x8b raw bytes",
    )
    response = gateway.request(
        "POST", "/api/users/v1/items", headers={"X-API-Key": key, "Content-Type": "application/json"}, body=b'{"n": 1}'
    )
    assert response.status == 201
    assert response.header_all("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert response.body == b"\x1f\x8b raw bytes"
    assert response.header("Content-Encoding") == "gzip"
    assert upstream.seen[0].body == b'{"n": 1}'
    assert upstream.seen[0].headers["content-type"] == "application/json"


def test_head_204_and_304_have_no_body(gateway, users_api, upstream, key):
    upstream.respond = lambda seen: Answer(status={"/svc/204": 204, "/svc/304": 304}.get(seen.path, 200), body=b"hello")
    head = gateway.request("HEAD", "/api/users/v1/x", headers={"X-API-Key": key})
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == "5"
    assert gateway.get("/api/users/v1/204", headers={"X-API-Key": key}).body == b""
    not_modified = gateway.get("/api/users/v1/304", headers={"X-API-Key": key})
    assert not_modified.status == 304 and not_modified.body == b""


def test_body_over_the_cap_is_refused_with_413_before_anything_is_sent(settings_gateway, users_api, upstream, key):
    from tests.gateway.conftest import InProcessGateway

    settings_gateway(MAX_BODY_BYTES=1000)
    gateway = InProcessGateway()
    response = gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"x" * 1001)
    assert response.status == 413
    assert response.json()["status"] == 413
    assert upstream.seen == []
    assert gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"x" * 1000).status == 200


def test_refusing_upstream_gives_502(gateway, acme, bob_app, key):
    _api(acme, bob_app, f"http://127.0.0.1:{free_port()}", retries=0)
    response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 502
    assert response.header("Content-Type") == "application/problem+json"
    assert set(response.json()) >= {"type", "title", "status", "detail", "request_id"}


def test_invalid_upstream_response_gives_502(gateway, acme, bob_app, key):
    with raw_upstream(garbage) as url:
        _api(acme, bob_app, url)
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 502


def test_stalling_upstream_gives_504_at_the_read_timeout_long_before_the_total_deadline(gateway, acme, bob_app, key):
    with raw_upstream(stall) as url:
        _api(acme, bob_app, url, read_timeout=0.5, total_timeout=5)
        started = time.monotonic()
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
        elapsed = time.monotonic() - started
    assert response.status == 504
    assert "did not answer in time" in response.json()["detail"]
    assert 0.5 <= elapsed < 2.5  # the read timeout, not the 5 s total (room for a loaded machine)


def test_trickling_upstream_is_cut_at_the_total_deadline_with_504(gateway, acme, bob_app, key):
    from tests.gateway.upstreams import trickle

    with raw_upstream(trickle) as url:
        _api(acme, bob_app, url, connect_timeout=0.5, read_timeout=1.0, total_timeout=1.2)
        started = time.monotonic()
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
        elapsed = time.monotonic() - started
    assert response.status == 504
    assert 1.2 <= elapsed < 3.5  # the trickle alone would take minutes (room for a loaded machine)


def test_connect_failure_is_retried_for_get_but_not_for_post(gateway, acme, bob_app, key):
    with recording_upstream() as live:
        dead = f"http://127.0.0.1:{free_port()}"
        _api(acme, bob_app, dead, retries=2, targets=[(live.url, 1)])
        statuses = [gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status for _ in range(4)]
        assert statuses == [200, 200, 200, 200]  # the dead target is retried away from, then skipped
        assert len(live.seen) == 4


def test_post_is_not_retried_after_a_connect_failure(gateway, acme, bob_app, key):
    with recording_upstream() as live:
        dead = f"http://127.0.0.1:{free_port()}"
        # Weight the dead target so that the first pick is the dead one.
        _api(acme, bob_app, dead, retries=3, targets=[(live.url, 1)])
        first = gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}")
        assert first.status == 502
        assert live.seen == []


def test_round_robin_follows_weights(gateway, acme, bob_app, key):
    with recording_upstream() as a, recording_upstream() as b:
        _api(acme, bob_app, a.url, targets=[(b.url, 2)])
        for _ in range(9):
            assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200
        assert (len(a.seen), len(b.seen)) == (3, 6)


def test_circuit_breaker_opens_after_the_threshold_and_recovers_through_one_probe(gateway, acme, bob_app, key):
    with recording_upstream() as flaky:
        healthy = {"ok": False}
        flaky.respond = lambda seen: Answer() if healthy["ok"] else Answer(status=503, body=b"down")
        # A recovery timeout long enough that the requests below all fall inside it on a loaded machine.
        _api(acme, bob_app, flaky.url, cb_failure_threshold=3, cb_recovery_timeout=1.0)
        statuses = [gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status for _ in range(5)]
        assert statuses == [503, 503, 503, 503, 503]
        assert len(flaky.seen) == 3  # the last two never reached the upstream
        opened = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
        assert opened.json()["type"].endswith("circuit-open") and opened.header("Retry-After") == "1"
        time.sleep(1.05)
        # Half-open: one probe fails → open again.
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 503
        assert len(flaky.seen) == 4
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).json()["type"].endswith("circuit-open")
        time.sleep(1.05)
        healthy["ok"] = True
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200  # the probe succeeds
        assert [gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status for _ in range(3)] == [200] * 3


def _usage_buckets(redis_client, tenant: str) -> dict[tuple[int, contract.Dimension], list[int]]:
    """The tenant's minute buckets in Redis, after this worker sent what it summed."""
    get_gateway().usage.flush()
    found = {}
    for key in redis_client.scan_iter(f"{contract.tag(tenant)}:m:*"):
        minute = int(key.decode().rsplit(":", 1)[1])
        for field, value in redis_client.hgetall(key).items():
            found[(minute, contract.Dimension.parse(field.decode()))] = contract.decode(value.decode())
    return found


def test_usage_is_summed_per_minute_bucket_and_sent_by_the_worker(gateway, acme, upstream, bob_app, key, redis_client):
    policy = services.policy_create(
        tenant=acme, name="p", policy_type="rate_limiting", config={"requests_per_second": 1000}, actor=None
    )
    api = publish(acme, upstream.url, policies=[policy])
    subscribe(bob_app, api)
    for _ in range(3):
        assert gateway.get("/api/users/v1/x", headers={"X-API-Key": key}).status == 200

    buckets = _usage_buckets(redis_client, "acme")
    key_id = ApiKey.objects.get(consumer=bob_app).key_id
    ((minute, dimension), numbers), *others = buckets.items()
    assert not others, "three requests, one bucket"
    assert dimension == contract.Dimension(api.id, bob_app.id, key_id, 200)
    assert minute == contract.minute_of(minute) and abs(minute - time.time()) < 120
    requests_, errors, bytes_in, bytes_out, latency_sum, latency_max, upstream_sum = numbers[:7]
    assert numbers[7:] == [0, 0, 0, 0]  # no WebSocket connection in a request's bucket
    assert (requests_, errors, bytes_in, bytes_out) == (3, 0, 0, 36)
    assert latency_sum >= latency_max > 0 and latency_sum >= upstream_sum > 0
    assert redis_client.sismember(contract.TENANTS_KEY, "acme"), "the flusher's index knows the tenant"


def test_refused_requests_are_counted_too(gateway, users_api, redis_client):
    gateway.get("/api/users/v1/x")
    (dimension,) = [d for _minute, d in _usage_buckets(redis_client, "acme")]
    assert dimension.status == 401 and dimension.key == ""


def test_chunked_request_body_is_streamed_to_the_upstream_unchanged(gateway, users_api, upstream, key):
    body = bytes(range(256)) * 1000  # 256 kB: several 64 kB reads, forwarded as they arrive
    response = gateway.request("POST", "/api/users/v1/upload", headers={"X-API-Key": key}, body=body, chunked=True)
    assert response.status == 200
    (seen,) = upstream.seen
    assert seen.body == body
    assert seen.headers.get("transfer-encoding", "").lower() == "chunked"  # no length was known, none invented


def test_chunked_body_crossing_the_cap_gets_413_and_the_upstream_never_gets_a_complete_request(
    settings_gateway, users_api, upstream, key
):
    # Without a Content-Length the size is unknown until the body has been read: the gateway streams it and
    # stops as soon as the cap is crossed. The upstream is left with a cut-off chunked message (the connection
    # is closed, never reused), so it never sees a complete request; the client gets 413.
    from tests.gateway.conftest import InProcessGateway

    settings_gateway(MAX_BODY_BYTES=100_000)
    gateway = InProcessGateway()
    too_big = gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"x" * 100_001, chunked=True)
    assert too_big.status == 413
    assert too_big.header("Content-Type") == "application/problem+json"
    assert "100000 bytes" in too_big.json()["detail"]
    time.sleep(0.1)
    assert upstream.seen == []
    at_cap = gateway.request("POST", "/api/users/v1/x", headers={"X-API-Key": key}, body=b"x" * 100_000, chunked=True)
    assert at_cap.status == 200
    assert len(upstream.seen[0].body) == 100_000


@pytest.mark.parametrize("method", ["GET", "POST"])  # the lean HTTP/1.1 client and urllib3
def test_upstream_name_repointed_to_a_private_address_is_refused_without_being_contacted(
    gateway, settings, acme, bob_app, key, method
):
    # Saved while allowed (or before its DNS changed); now the name resolves to loopback. The address is vetted
    # before the connect: the upstream never even sees a TCP connection (so its ports cannot be probed).
    received = Received()
    with raw_upstream(answering(received)) as url:
        _api(acme, bob_app, url.replace("127.0.0.1", "localhost"), retries=0)
        assert (
            gateway.request(
                method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" if method == "POST" else b""
            ).status
            == 200
        )
        received.connections = 0
        settings.UPSTREAM_ALLOW_PRIVATE = False
        gateway = InProcessGateway()  # fresh pools: no connection made while allowed is reused
        response = gateway.request(
            method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" if method == "POST" else b""
        )
    assert response.status == 502
    assert response.header("Content-Type") == "application/problem+json"
    assert response.json()["detail"] == UNREACHABLE
    assert received.connections == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_address_and_a_refused_connection_get_the_same_answer(gateway, settings, acme, bob_app, key, method):
    # Two different answers would tell which internal ports are open.
    _api(acme, bob_app, f"http://127.0.0.1:{free_port()}", retries=0)
    refused = gateway.request(
        method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" if method == "POST" else b""
    )
    settings.UPSTREAM_ALLOW_PRIVATE = False
    not_allowed = InProcessGateway().request(
        method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" if method == "POST" else b""
    )
    assert refused.status == not_allowed.status == 502
    assert refused.json()["detail"] == not_allowed.json()["detail"] == UNREACHABLE


def test_lean_client_can_be_switched_off(settings_gateway, users_api, upstream, key):
    from gateway.wsgi import get_gateway, reset_gateway
    from tests.gateway.conftest import InProcessGateway

    settings_gateway(LEAN_HTTP1=False)
    reset_gateway()
    gw = InProcessGateway()
    response = gw.get("/api/users/v1/x?a=1", headers={"X-API-Key": key})
    assert response.status == 200
    assert upstream.seen[-1].path == "/svc/x?a=1" or upstream.paths[-1].startswith("/svc/x")
    upstreams = get_gateway().upstreams
    assert upstreams.lean == {} and upstreams.pools


def test_requests_sharing_a_client_request_id_are_each_counted(gateway, acme, upstream, bob_app, key, redis_client):
    # X-Request-ID is the client's to choose (and is passed on); usage must not be deduplicated by it.
    from apimgmt.models import UsageRecord
    from apimgmt.usage import UsageFlusher

    api = publish(acme, upstream.url)
    subscribe(bob_app, api)
    for _ in range(3):
        answer = gateway.get("/api/users/v1/x", headers={"X-API-Key": key, "X-Request-ID": "same-id-every-time"})
        assert answer.status == 200 and answer.header("X-Request-ID") == "same-id-every-time"
    from gateway.wsgi import get_gateway

    get_gateway().usage.flush()
    UsageFlusher(client=redis_client, consumer="t").drain()
    assert sum(r.request_count for r in UsageRecord.objects.filter(api_id=api.id)) == 3


def _answer_with(head: bytes, body: bytes):
    def behaviour(conn) -> None:
        read_request_head(conn)
        conn.sendall(head + b"\r\n\r\n" + body)
        conn.close()

    return behaviour


@pytest.mark.parametrize("method", ["GET", "POST"])  # the lean HTTP/1.1 client and urllib3
def test_chunked_response_that_also_claims_a_length_is_passed_on_without_that_length(
    gateway, acme, bob_app, key, method
):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked"
    with raw_upstream(_answer_with(head, b"5\r\nhello\r\n0\r\n\r\n")) as url:
        _api(acme, bob_app, url, retries=0)
        response = gateway.request(
            method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" * (method == "POST")
        )
    assert response.status == 200 and response.body == b"hello"
    assert response.header("Content-Length") is None and response.header("Transfer-Encoding") is None


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("length", [b"+5", b"\xb2", b" 5x", b"5, 5", b"9" * 5000, b"-5"])
def test_response_length_that_is_not_plain_digits_gives_502(gateway, acme, bob_app, key, method, length):
    # "²" (one latin-1 byte) passes str.isdigit() but not int(); "+5" is a number to Python but not to HTTP.
    with raw_upstream(_answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: " + length, b"hello")) as url:
        _api(acme, bob_app, url, retries=0)
        response = gateway.request(
            method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" * (method == "POST")
        )
    assert response.status == 502
    assert response.header("Content-Type") == "application/problem+json"
    assert "invalid response" in response.json()["detail"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_repeated_equal_length_is_passed_on_once(gateway, acme, bob_app, key, method):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Between: 1\r\nContent-Length: 5"
    with raw_upstream(_answer_with(head, b"hello")) as url:
        _api(acme, bob_app, url, retries=0)
        response = gateway.request(
            method, "/api/users/v1/x", headers={"X-API-Key": key}, body=b"{}" * (method == "POST")
        )
    assert response.status == 200 and response.body == b"hello"
    assert response.header_all("Content-Length") == ["5"] and response.header("X-Between") == "1"


def test_https_upstream_is_reached_at_its_vetted_address_with_sni_and_certificate_checked_for_its_name(
    gateway, settings, monkeypatch, tmp_path, acme, bob_app, key
):
    cert, private_key = self_signed_certificate(tmp_path, "localhost")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted as its own CA by the gateway's TLS
    server_names: list[str | None] = []
    with raw_upstream(tls_answering(cert, private_key, server_names)) as url:
        _api(acme, bob_app, url.replace("http://127.0.0.1", "https://localhost"), retries=0)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
        assert (response.status, response.body) == (200, b"ok")
        assert server_names == ["localhost"]  # the name, though the socket was connected to a vetted address

        settings.UPSTREAM_ALLOW_PRIVATE = False  # localhost is now refused: not even the handshake starts
        refused = InProcessGateway().get("/api/users/v1/x", headers={"X-API-Key": key})
        assert (refused.status, refused.json()["detail"]) == (502, UNREACHABLE)
        assert server_names == ["localhost"]


def test_https_upstream_whose_certificate_names_another_host_gives_502(
    gateway, monkeypatch, tmp_path, acme, bob_app, key
):
    cert, private_key = self_signed_certificate(tmp_path, "other.example")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with raw_upstream(tls_answering(cert, private_key, [])) as url:
        _api(acme, bob_app, url.replace("http://127.0.0.1", "https://localhost"), retries=0)
        response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 502
