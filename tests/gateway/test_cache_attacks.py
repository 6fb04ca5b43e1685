"""Attacks on the response cache: poisoning through what the key leaves out, answers reaching callers they were not
made for, Cache-Control and Set-Cookie spellings, and the single-flight wait as a denial of service.

A real upstream on loopback counts what reaches it; Redis is real. Some tests pin a defence that already held; the
others failed before the fix they come with (the Host and forwarded host the upstream hears, a plan's header
transforms, a slow reader holding every waiter of a large answer, Set-Cookie2).
"""

from __future__ import annotations

import io
import time
from typing import Any

import pytest

from apimgmt import services
from apimgmt.models import Api, Consumer, Plan, Policy, Tenant
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.jwt_support import ISS, bearer, publish_for_tokens, rsa_key
from tests.gateway.upstreams import Answer, Recorder, Seen

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_cache_worker_state")]

PATH = "/api/users/v1/items"


def _cache(tenant: Tenant, **config: Any) -> Policy:
    return services.policy_create(tenant=tenant, name="cache", policy_type="response_cache", config=config, actor=None)


def _cached_api(tenant: Tenant, consumer: Consumer, upstream: Recorder, *more: Policy, **options: Any) -> Api:
    config = options.pop("config", {})
    api = publish(tenant, upstream.url, policies=[_cache(tenant, **config), *more], **options)
    subscribe(consumer, api, options["plans"][0] if options.get("plans") else None)
    return api


def _counting(recorder: Recorder, headers: list[tuple[str, str]], status: int = 200) -> None:
    def respond(seen: Seen) -> Answer:
        return Answer(
            status=status,
            headers=[("Content-Type", "text/plain"), *headers],
            body=f"answer {len(recorder.seen)}".encode(),
        )

    recorder.respond = respond


def _get(gateway: InProcessGateway, key: str, target: str = PATH, **kwargs: Any) -> Any:
    headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
    return gateway.get(target, headers=headers, **kwargs)


# -- poisoning through what the key leaves out ---------------------------------------------------------------------


def test_the_host_the_upstream_hears_is_part_of_the_key(gateway, acme, bob_app, key, upstream):
    # The upstream builds absolute links and redirects from X-Forwarded-Host, which the gateway fills from the
    # client's Host. Before the fix the key had no host: one request with "Host: evil.example" stored a redirect to
    # evil.example that every other client of the URL then got from the cache.
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(
        status=301,
        headers=[("Location", f"https://{seen.headers['x-forwarded-host']}/next"), ("Cache-Control", "max-age=60")],
        body=b"",
    )
    poisoned = _get(gateway, key, host="evil.example")
    assert poisoned.header("Location") == "https://evil.example/next"
    for host in ("testserver", "TESTSERVER"):
        victim = _get(gateway, key, host=host)
        assert victim.header("Location") == f"https://{host}/next", host
    assert _get(gateway, key, host="testserver").header("X-Cache") == "HIT"  # the cache still works per host
    assert _get(gateway, key, host="testserver:8080").header("Location") == "https://testserver:8080/next"


def test_a_forwarded_host_from_a_trusted_proxy_is_part_of_the_key(
    gateway, settings_gateway, acme, bob_app, key, upstream
):
    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")],
        body=f"{seen.headers['x-forwarded-proto']}://{seen.headers['x-forwarded-host']}/img.png".encode(),
    )
    behind = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    assert _get(gateway, key, headers=behind, remote_addr="10.0.0.5").body == b"http://evil.example/img.png"
    assert _get(gateway, key, remote_addr="10.0.0.5").body == b"http://testserver/img.png"
    honest = {"X-Forwarded-Host": "api.example.com", "X-Forwarded-Proto": "https"}
    assert _get(gateway, key, headers=honest, remote_addr="10.0.0.5").body == b"https://api.example.com/img.png"
    # from an untrusted peer the headers are not passed on, so they need not split the entry either way
    assert _get(gateway, key, headers=behind, remote_addr="203.0.113.1").body == b"http://testserver/img.png"


def test_a_plans_header_transforms_keep_its_answers_to_its_subscribers(gateway, acme, bob_app, key, upstream):
    # A gold plan's transform tells the upstream "X-Plan: gold", and the upstream answers gold subscribers with more.
    # Before the fix the key had no plan: a free subscriber got the gold answer from the cache.
    gold_headers = services.policy_create(
        tenant=acme,
        name="gold-headers",
        policy_type="headers",
        config={"request": {"set": {"X-Plan": "gold"}}},
        actor=None,
    )
    gold = services.plan_create(tenant=acme, name="gold", actor=None, policies=[gold_headers])
    free = services.plan_create(tenant=acme, name="free", actor=None)
    api = _cached_api(acme, bob_app, upstream, plans=[gold, free])
    carl_app = services.consumer_create(tenant=acme, name="carl-app", actor=None)
    subscribe(carl_app, api, free)
    carl_key = services.api_key_create(consumer=carl_app, actor=None)[1]
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")], body=f"plan {seen.headers.get('x-plan', 'free')}".encode()
    )
    assert _get(gateway, key).body == b"plan gold"
    assert _get(gateway, carl_key).body == b"plan free"
    assert (_get(gateway, key).header("X-Cache"), _get(gateway, carl_key).header("X-Cache")) == ("HIT", "HIT")
    assert _get(gateway, carl_key).body == b"plan free"
    assert Plan.objects.count() == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/api/users/v1/a", "/api/users/v1/a/"),
        ("/api/users/v1/a", "/api/users/v1/%61"),
        ("/api/users/v1/a?x=1&y=2", "/api/users/v1/a?y=2&x=1"),
        ("/api/users/v1/a?x=1", "/api/users/v1/a?x=1&"),
        ("/api/users/v1/a?x=%31", "/api/users/v1/a?x=1"),
    ],
)
def test_spellings_of_a_target_never_share_an_answer_the_upstream_gave_another(
    gateway, acme, bob_app, key, upstream, first, second
):
    # Whatever two spellings share an entry, a hit must be what the upstream answers to that very spelling (it is
    # asked afresh with no-cache): the key covers the target exactly as the upstream receives it.
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "max-age=60")], body=seen.path.encode())
    _get(gateway, key, first)
    _get(gateway, key, second)
    for target in (first, second):
        cached = _get(gateway, key, target)
        assert cached.header("X-Cache") == "HIT"
        fresh = _get(gateway, key, target, headers={"Cache-Control": "no-cache"})
        assert fresh.header("X-Cache") == "BYPASS"
        assert cached.body == fresh.body, target


def test_the_key_of_one_tenants_api_never_serves_anothers(gateway, acme, globex, bob_app, key, upstream):
    _cached_api(acme, bob_app, upstream)
    other = services.consumer_create(tenant=globex, name="globex-app", actor=None)
    api = publish(globex, upstream.url, base_path="/api/globex/v1", policies=[_cache(globex)])
    subscribe(other, api)
    other_key = services.api_key_create(consumer=other, actor=None)[1]
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")], body=seen.headers["x-tenant-id"].encode()
    )
    assert _get(gateway, key).body == b"acme"
    assert _get(gateway, other_key, "/api/globex/v1/items").body == b"globex"
    assert _get(gateway, key).body == b"acme"


# -- what is never stored --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("set-cookie", "s=1")],
        [("SET-COOKIE", "s=1")],
        [("Set-Cookie2", "s=1; Version=1")],
        [("Cache-Control", "max-age=60"), ("Cache-Control", "no-store")],
        [("Cache-Control", "max-age=60, NO-STORE")],
        [("Cache-Control", 'private="Authorization", max-age=60')],
        [("Cache-Control", 'no-cache="Set-Cookie", max-age=60')],
        [("Cache-Control", "max-age=-1")],
        [("Cache-Control", "max-age=1e9")],
        [("Cache-Control", "s-maxage=0, max-age=60")],
        [("Expires", "0")],
        [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
        [("Age", "120"), ("Cache-Control", "max-age=60")],
        [("Vary", "*")],
        [("Vary", "Host")],
        [("Vary", "X-Forwarded-For")],
        [("Content-Type", "text/event-stream")],
    ],
)
def test_answers_that_must_not_be_shared_are_never_stored(gateway, acme, bob_app, key, upstream, headers):
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, headers)
    answers = [_get(gateway, key) for _ in range(2)]
    assert [a.body for a in answers] == [b"answer 1", b"answer 2"]


def test_a_partial_answer_is_never_stored_nor_served_for_the_whole(gateway, acme, bob_app, key, upstream):
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: (
        Answer(status=206, headers=[("Content-Range", "bytes 0-1/10"), ("Cache-Control", "max-age=60")], body=b"01")
        if "range" in seen.headers
        else Answer(headers=[("Cache-Control", "max-age=60")], body=b"0123456789")
    )
    assert _get(gateway, key, headers={"Range": "bytes=0-1"}).status == 206
    whole = _get(gateway, key)
    assert (whole.status, whole.body, whole.header("X-Cache")) == (200, b"0123456789", "MISS")


def test_a_head_never_fills_the_entry_a_get_reads(gateway, acme, bob_app, key, upstream):
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    assert gateway.request("HEAD", PATH, headers={"X-API-Key": key}).body == b""
    got = _get(gateway, key)
    assert (got.body, got.header("X-Cache")) == (b"answer 2", "MISS")
    head = gateway.request("HEAD", PATH, headers={"X-API-Key": key})
    assert (head.body, head.header("X-Cache"), head.header("Content-Length")) == (b"", "HIT", "8")


def test_a_callers_own_authorization_passed_upstream_keeps_its_answer_private(gateway, acme, bob_app, key, upstream):
    # The API's credential is X-API-Key; the client also sends its own Authorization, which the upstream sees. Such an
    # answer is shared only when the upstream marks it so (RFC 9111 §3.5), in any spelling of the header name.
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        _get(gateway, key, headers={name: "Basic YTpi"})
    assert len(upstream.seen) == 3


# -- the single-flight wait ------------------------------------------------------------------------------------------


def _open(gateway: InProcessGateway, target: str, headers: dict[str, str]) -> Any:
    """Start a request and return its body unread (a client that reads its answer slowly)."""
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": target,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return gateway.app(environ, lambda status, headers, exc_info=None: None)


def test_a_slow_reader_of_a_large_answer_does_not_hold_the_other_requests_for_it(gateway, acme, bob_app, key, upstream):
    # The first request for a key fetches it for the worker; the others wait for it. A large answer passes to that
    # first client as it reads, and was stored (and the others released) only once it had read everything: a
    # client reading slowly held every other request for the URL for the API's whole timeout (up to 30 s each, a
    # worker thread each). Now the others are released as soon as the answer turns out to be streamed.
    _cached_api(acme, bob_app, upstream, total_timeout=4)
    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "max-age=60")], body=b"b" * 200_000)
    assert _get(gateway, key, "/api/users/v1/warm").status == 200  # the route table and the key are loaded
    slow = _open(gateway, PATH, {"X-API-Key": key})
    try:
        started = time.monotonic()
        other = _get(gateway, key)
        waited = time.monotonic() - started
        assert other.status == 200 and other.body == b"b" * 200_000
        assert waited < 2.0, f"the second request waited {waited:.1f} s for the slow reader"
    finally:
        assert b"".join(slow) == b"b" * 200_000
        slow.close()
    assert _get(gateway, key).header("X-Cache") == "HIT"


def test_a_callers_own_cookie_passed_upstream_keeps_its_answer_private(gateway, acme, bob_app, key, upstream):
    # A browser app calls with one API key for all its users, and the upstream knows each user by a session cookie.
    # An answer to a request with Cookie is a user's own unless the upstream marks it shareable; before the fix the
    # first user's page went to the next caller (with another cookie, or none).
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")], body=f"page of {seen.headers.get('cookie', 'nobody')}".encode()
    )
    assert _get(gateway, key, headers={"Cookie": "session=alice"}).body == b"page of session=alice"
    assert _get(gateway, key, headers={"Cookie": "session=mallory"}).body == b"page of session=mallory"
    assert _get(gateway, key).body == b"page of nobody"
    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "public, max-age=60")], body=b"for everyone")
    _get(gateway, key, "/api/users/v1/public", headers={"Cookie": "session=alice"})
    shared = _get(gateway, key, "/api/users/v1/public", headers={"Cookie": "session=mallory"})
    assert (shared.header("X-Cache"), shared.body) == ("HIT", b"for everyone")


def test_values_a_transform_makes_from_token_claims_are_part_of_the_key(gateway, acme, bob_app, upstream):
    # A transform tells the upstream the caller's role from its token ("X-Role: {jwt.role}"), and the upstream shows
    # admins more. One consumer, two tokens: before the fix the reader got the admin's answer from the cache.
    signer = rsa_key("k1")
    issuer = services.jwt_issuer_create(
        tenant=acme, name="idp", issuer=ISS, audiences=["users"], public_keys={"keys": [signer.jwk]}, actor=None
    )
    role = services.policy_create(
        tenant=acme,
        name="role",
        policy_type="headers",
        config={"request": {"set": {"X-Role": "{jwt.role}"}}},
        actor=None,
    )
    publish_for_tokens(acme, upstream.url, bob_app, issuer, policies=[_cache(acme), role])

    def token(claims: dict[str, Any]) -> dict[str, str]:
        return bearer(signer.token(aud="users", **claims))

    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")], body=f"view of {seen.headers.get('x-role', 'nobody')}".encode()
    )
    assert gateway.get(PATH, headers=token({"role": "admin"})).body == b"view of admin"
    reader = gateway.get(PATH, headers=token({"role": "reader"}))
    assert reader.status == 200 and reader.body == b"view of reader"
    again = gateway.get(PATH, headers=token({"role": "reader", "jti": "another"}))
    assert (again.header("X-Cache"), again.body) == ("HIT", b"view of reader")  # the same role shares the entry
    assert gateway.get(PATH, headers=token({})).body == b"view of nobody"


@pytest.mark.parametrize(
    "config",
    [
        {"ttl_seconds": -5},  # every store failed in Redis, which then counted as down for everyone
        {"ttl_seconds": 10**9},
        {"per_consumer": "false"},  # a string: was taken as true
        {"vary_headers": "accept"},  # a string: each letter was a header
        {"vary_headers": ["Authorization"]},
        {"max_entry_bytes": 10**12},
    ],
)
def test_an_old_cache_row_the_validator_refuses_leaves_the_api_uncached(
    gateway, acme, bob_app, key, upstream, caplog, config
):
    policy = _cache(acme)
    api = publish(acme, upstream.url, policies=[policy])
    subscribe(bob_app, api)
    Policy.objects.filter(pk=policy.pk).update(config=config)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    with caplog.at_level("ERROR", logger="gateway.policies.response_cache"):
        answers = [_get(gateway, key) for _ in range(2)]
    assert [(a.body, a.header("X-Cache")) for a in answers] == [(b"answer 1", None), (b"answer 2", None)]
    assert "policy cache" in caplog.text and "is invalid" in caplog.text
