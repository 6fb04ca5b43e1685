"""The response cache (policy type response_cache): what is kept, for whom, for how long, and what a hit looks like.

Every test runs a real upstream on loopback that counts what reaches it, and real Redis; the in-process gateway
answers unless the test needs several gunicorn workers.
"""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from apimgmt import services, usage_buckets
from apimgmt.models import Api, Consumer, Policy, Tenant
from apimgmt.redis_client import get_redis, reset_redis
from gateway.policies import response_cache
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, subscribe
from tests.gateway.upstreams import Answer, Recorder, Seen, recording_upstream
from tests.support.servers import free_port, gunicorn, wait_for_port

pytestmark = pytest.mark.usefixtures("fresh_cache_worker_state")

PATH = "/api/users/v1/items?page=2"


def _cache_policy(tenant: Tenant, **config: Any) -> Policy:
    return services.policy_create(tenant=tenant, name="cache", policy_type="response_cache", config=config, actor=None)


class _Limits:
    on = False


@pytest.fixture(autouse=True, params=["own-read", "read-with-limits"])
def _read_paths(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test twice: on an API without limits, where the cache step reads Redis itself, and on one with a
    generous rate limit, where the lookup's GET rides on the limiter's write and a hit ends the request in the limits
    step (chain.Step.reads_with_limits). What a client sees must not differ."""
    _Limits.on = request.param == "read-with-limits"
    yield
    _Limits.on = False


def _limited(tenant: Tenant, policies: list[Policy]) -> list[Policy]:
    """``policies``, plus a generous rate limit when this run reads with the limits and they have none."""
    if not _Limits.on or any(p.policy_type == "rate_limiting" for p in policies):
        return policies
    generous = Policy.objects.filter(tenant=tenant, name="generous").first() or services.policy_create(
        tenant=tenant, name="generous", policy_type="rate_limiting", config={"requests_per_second": 10_000}, actor=None
    )
    return [*policies, generous]


def _cached_api(tenant: Tenant, consumer: Consumer, upstream: Recorder, *more: Policy, **config: Any) -> Api:
    api = publish(tenant, upstream.url, policies=_limited(tenant, [_cache_policy(tenant, **config), *more]))
    subscribe(consumer, api)
    return api


def _counting(recorder: Recorder, headers: list[tuple[str, str]] | None = None, status: int = 200) -> None:
    """The upstream answers with a body naming how many requests it has seen (so a stale answer shows)."""

    def respond(seen: Seen) -> Answer:
        return Answer(
            status=status,
            headers=[("Content-Type", "text/plain"), *(headers or [])],
            body=f"answer {len(recorder.seen)}".encode(),
        )

    recorder.respond = respond


def test_a_repeat_get_is_answered_from_the_cache_with_age_and_its_own_request_id(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60"), ("ETag", '"v1"'), ("Connection", "X-Hop"), ("X-Hop", "1")])
    first = gateway.get(PATH, headers={"X-API-Key": key})
    second = gateway.get(PATH, headers={"X-API-Key": key})

    assert (first.status, first.body, first.header("X-Cache")) == (200, b"answer 1", "MISS")
    assert (second.status, second.body, second.header("X-Cache")) == (200, b"answer 1", "HIT")
    assert len(upstream.seen) == 1
    assert second.header("ETag") == '"v1"' and second.header("Content-Type") == "text/plain"
    assert second.header("Cache-Control") == "max-age=60"
    assert second.header("Content-Length") == "8"
    assert second.header("Age") == "0"
    assert second.header("X-Hop") is None  # named by Connection: hop-by-hop, never passed on nor stored
    assert first.header("X-Request-ID") != second.header("X-Request-ID")
    assert len(second.header_all("X-Request-ID")) == 1


def test_age_grows_from_the_upstreams_own_age_and_the_entry_ends_with_its_freshness(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=3"), ("Age", "1")])
    gateway.get(PATH, headers={"X-API-Key": key})
    assert gateway.get(PATH, headers={"X-API-Key": key}).header("Age") == "1"
    time.sleep(1.1)
    later = gateway.get(PATH, headers={"X-API-Key": key})
    assert later.header("X-Cache") == "HIT" and int(later.header("Age") or 0) >= 2
    time.sleep(1.1)  # 3 s of freshness less the 1 s it was old on arrival: gone
    after = gateway.get(PATH, headers={"X-API-Key": key})
    assert (after.header("X-Cache"), after.body) == ("MISS", b"answer 2")


def test_a_hit_is_recorded_like_any_request_without_upstream_time(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream)
    with caplog.at_level("INFO", logger="gateway.access"):
        miss = gateway.get(PATH, headers={"X-API-Key": key})
        hit = gateway.get(PATH, headers={"X-API-Key": key})
    lines = {r.__dict__["request_id"]: r.__dict__ for r in caplog.records if r.name == "gateway.access"}
    missed, served = lines[miss.header("X-Request-ID")], lines[hit.header("X-Request-ID")]
    assert (missed["status"], served["status"]) == (200, 200)
    assert served["consumer"] == missed["consumer"] == bob_app.id
    assert missed["upstream_ms"] is not None and served["upstream_ms"] is None


def test_an_answer_to_a_request_with_authorization_is_kept_only_when_marked_shareable(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    headers = {"X-API-Key": key, "Authorization": "Basic dXNlcjpwYXNz"}  # passed on to the upstream
    _counting(upstream, [("Cache-Control", "max-age=60")])
    for _ in range(2):
        assert gateway.get("/api/users/v1/mine", headers=headers).header("X-Cache") == "MISS"
    _counting(upstream, [("Cache-Control", "public, max-age=60")])
    gateway.get("/api/users/v1/shared", headers=headers)
    assert gateway.get("/api/users/v1/shared", headers=headers).header("X-Cache") == "HIT"


def test_the_policys_ttl_caps_a_longer_upstream_freshness(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream, ttl_seconds=1)
    _counting(upstream, [("Cache-Control", "public, max-age=3600")])
    gateway.get(PATH, headers={"X-API-Key": key})
    assert gateway.get(PATH, headers={"X-API-Key": key}).header("X-Cache") == "HIT"
    time.sleep(1.2)
    assert gateway.get(PATH, headers={"X-API-Key": key}).body == b"answer 2"


@pytest.mark.parametrize(
    "headers",
    [
        [("Cache-Control", "private, max-age=60")],
        [("Cache-Control", "no-store")],
        [("Cache-Control", "no-cache")],
        [("Cache-Control", "max-age=0")],
        [("Cache-Control", "max-age=60"), ("Set-Cookie", "session=abc; HttpOnly")],
        [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
        [("Expires", "not a date")],
        [("Vary", "*")],
        [("Vary", "X-Forwarded-For")],  # the gateway sets it per request
        [("Cache-Control", "max-age=60"), ("Content-Type", "text/event-stream")],
    ],
    ids=[
        "private",
        "no-store",
        "no-cache",
        "max-age=0",
        "set-cookie",
        "expired",
        "bad-expires",
        "vary-star",
        "vary-xff",
        "event-stream",
    ],
)
def test_answers_the_upstream_forbids_or_that_belong_to_one_client_are_never_cached(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
    headers: list[tuple[str, str]],
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, headers)
    answers = [gateway.get(PATH, headers={"X-API-Key": key}) for _ in range(3)]
    assert [a.body for a in answers] == [b"answer 1", b"answer 2", b"answer 3"]
    assert {a.header("X-Cache") for a in answers} == {"MISS"}


@pytest.mark.parametrize("status, cached", [(200, True), (404, True), (410, True), (500, False), (302, False)])
def test_only_cacheable_statuses_are_kept(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
    status: int,
    cached: bool,
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Location", "/elsewhere")] if status == 302 else [], status=status)
    gateway.get(PATH, headers={"X-API-Key": key})
    again = gateway.get(PATH, headers={"X-API-Key": key})
    assert again.status == status
    assert (again.header("X-Cache") == "HIT") is cached
    assert len(upstream.seen) == (1 if cached else 2)


def test_expires_gives_the_lifetime_when_there_is_no_max_age(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    from email.utils import formatdate

    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Date", formatdate(usegmt=True)), ("Expires", formatdate(time.time() + 60, usegmt=True))])
    gateway.get(PATH, headers={"X-API-Key": key})
    assert gateway.get(PATH, headers={"X-API-Key": key}).header("X-Cache") == "HIT"


def test_vary_is_honoured_each_variant_its_own_entry(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language"), ("Content-Language", "x")],
        body=f"hello in {seen.headers.get('accept-language', 'none')}".encode(),
    )

    def get(language: str | None) -> tuple[bytes, str | None]:
        headers = {"X-API-Key": key, **({"Accept-Language": language} if language else {})}
        answer = gateway.get(PATH, headers=headers)
        return answer.body, answer.header("X-Cache")

    assert get("en") == (b"hello in en", "MISS")
    assert get("de") == (b"hello in de", "MISS")
    assert get(None) == (b"hello in none", "MISS")
    assert get("en") == (b"hello in en", "HIT")
    assert get("de") == (b"hello in de", "HIT")
    assert get(None) == (b"hello in none", "HIT")
    assert len(upstream.seen) == 3

    response_cache._vary_memo.clear()  # another worker, which has not learnt the Vary names yet
    assert get("de") == (b"hello in de", "HIT")


def test_the_policys_vary_headers_are_part_of_the_key(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream, vary_headers=["X-Tenant-Region"])
    _counting(upstream)
    for region in ("eu", "us", "eu", "us"):
        gateway.get(PATH, headers={"X-API-Key": key, "X-Tenant-Region": region})
    assert len(upstream.seen) == 2


def test_path_and_query_are_part_of_the_key_and_the_credential_parameter_is_not(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    api = publish(acme, upstream.url, policies=_limited(acme, [_cache_policy(acme)]), key_query_param="apikey")
    subscribe(bob_app, api)
    _counting(upstream)
    gateway.get("/api/users/v1/items?page=1", headers={"X-API-Key": key})
    gateway.get("/api/users/v1/items?page=2", headers={"X-API-Key": key})
    gateway.get("/api/users/v1/other?page=1", headers={"X-API-Key": key})
    assert len(upstream.seen) == 3
    hit = gateway.get(f"/api/users/v1/items?page=1&apikey={key}")
    assert (hit.status, hit.header("X-Cache"), hit.body) == (200, "HIT", b"answer 1")


def _second_consumer(tenant: Tenant, api: Api) -> str:
    carl_app = services.consumer_create(tenant=tenant, name="carl-app", actor=None)
    subscribe(carl_app, api)
    return services.api_key_create(consumer=carl_app, actor=None)[1]


def _echo_consumer(recorder: Recorder, headers: list[tuple[str, str]]) -> None:
    recorder.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60"), *headers], body=f"data of {seen.headers['x-consumer-id']}".encode()
    )


def test_per_consumer_one_consumers_cached_answer_never_reaches_another(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    api = _cached_api(acme, bob_app, upstream, per_consumer=True)
    other_key = _second_consumer(acme, api)
    _echo_consumer(upstream, [])
    bob_first = gateway.get(PATH, headers={"X-API-Key": key})
    carl_first = gateway.get(PATH, headers={"X-API-Key": other_key})
    bob_again = gateway.get(PATH, headers={"X-API-Key": key})
    carl_again = gateway.get(PATH, headers={"X-API-Key": other_key})
    assert bob_first.body == bob_again.body == f"data of {bob_app.id}".encode()
    assert carl_first.body == carl_again.body != bob_first.body
    assert [a.header("X-Cache") for a in (bob_first, carl_first, bob_again, carl_again)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]


def test_without_per_consumer_one_entry_is_shared_unless_the_upstream_varies_on_the_consumer(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    api = _cached_api(acme, bob_app, upstream)
    other_key = _second_consumer(acme, api)
    _echo_consumer(upstream, [])
    gateway.get(PATH, headers={"X-API-Key": key})
    shared = gateway.get(PATH, headers={"X-API-Key": other_key})
    assert (shared.header("X-Cache"), shared.body) == ("HIT", f"data of {bob_app.id}".encode())

    _echo_consumer(upstream, [("Vary", "X-Consumer-ID")])
    target = "/api/users/v1/mine"
    gateway.get(target, headers={"X-API-Key": key})
    # carl sends bob's consumer id himself: the key takes the gateway's value, never the client's
    carl = gateway.get(target, headers={"X-API-Key": other_key, "X-Consumer-ID": bob_app.id})
    assert carl.header("X-Cache") == "MISS" and carl.body != f"data of {bob_app.id}".encode()
    assert gateway.get(target, headers={"X-API-Key": key}).header("X-Cache") == "HIT"


def test_a_change_to_the_api_or_its_policy_purges_its_entries(
    acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    policy = _cache_policy(acme, ttl_seconds=600)
    api = publish(acme, upstream.url, policies=_limited(acme, [policy]))
    subscribe(bob_app, api)
    _counting(upstream)

    def get() -> tuple[bytes, str | None]:
        answer = InProcessGateway().get(PATH, headers={"X-API-Key": key})  # a worker on the current configuration
        return answer.body, answer.header("X-Cache")

    assert get() == (b"answer 1", "MISS")
    assert get() == (b"answer 1", "HIT")
    services.policy_update(policy=policy, config={"ttl_seconds": 300}, actor=None)
    assert get() == (b"answer 2", "MISS")
    assert get() == (b"answer 2", "HIT")
    services.api_update(api=Api.objects.get(pk=api.pk), read_timeout=12.0, actor=None)
    assert get() == (b"answer 3", "MISS")


def test_head_is_answered_from_the_get_entry_without_a_body(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    head = gateway.request("HEAD", PATH, headers={"X-API-Key": key})
    assert (head.status, head.body, head.header("X-Cache")) == (200, b"", "MISS")  # nothing to keep: no body
    get = gateway.get(PATH, headers={"X-API-Key": key})
    assert (get.body, get.header("X-Cache")) == (b"answer 2", "MISS")
    head = gateway.request("HEAD", PATH, headers={"X-API-Key": key})
    assert (head.status, head.body, head.header("Content-Length"), head.header("X-Cache")) == (200, b"", "8", "HIT")
    assert gateway.get(PATH, headers={"X-API-Key": key}).header("X-Cache") == "HIT"
    assert [s.method for s in upstream.seen] == ["HEAD", "GET"]


def test_other_methods_pass_by_the_cache(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    for method in ("POST", "PUT", "DELETE", "POST", "GET", "GET"):  # a GET with a body too: the key has no body
        answer = gateway.request(method, PATH, headers={"X-API-Key": key}, body=b"{}")
        assert answer.header("X-Cache") is None
    assert len(upstream.seen) == 6


def test_a_client_asking_for_a_fresh_answer_skips_the_lookup(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    gateway.get(PATH, headers={"X-API-Key": key})
    fresh = gateway.get(PATH, headers={"X-API-Key": key, "Cache-Control": "no-cache"})
    assert (fresh.body, fresh.header("X-Cache")) == (b"answer 2", "BYPASS")
    assert gateway.get(PATH, headers={"X-API-Key": key}).body == b"answer 2"  # no-cache refreshed the entry
    unstored = gateway.get(PATH, headers={"X-API-Key": key, "Cache-Control": "no-store"})
    assert unstored.body == b"answer 3"
    assert gateway.get(PATH, headers={"X-API-Key": key}).body == b"answer 2"  # no-store left it alone


def test_entries_above_the_size_cap_are_not_kept_and_large_bodies_within_it_are(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream, max_entry_bytes=300_000)
    upstream.respond = lambda seen: Answer(
        headers=[("Cache-Control", "max-age=60")], body=(b"x" if "big" in seen.path else b"y") * 200_000
    )
    for target in ("/api/users/v1/large", "/api/users/v1/large"):
        answer = gateway.get(target, headers={"X-API-Key": key})
        assert answer.body == b"y" * 200_000  # streamed past the 64 KiB buffer, kept while passed on
    assert answer.header("X-Cache") == "HIT" and len(upstream.seen) == 1

    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "max-age=60")], body=b"z" * 300_001)
    for _ in range(2):
        assert gateway.get("/api/users/v1/huge", headers={"X-API-Key": key}).header("X-Cache") == "MISS"
    assert len(upstream.seen) == 3
    assert response_cache._buffered.used == 0  # what was held while streaming is given back


def _environ(target: str, key: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "RAW_URI": target,
        "PATH_INFO": target,
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "HTTP_X_API_KEY": key,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }


def test_a_worker_holds_at_most_its_buffer_of_streamed_answers(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _cached_api(acme, bob_app, upstream)
    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "max-age=60")], body=b"y" * 100_000)
    url = "/api/users/v1/large"
    held: Any = gateway.app(_environ(url, key), lambda status, headers: None)  # one answer still being sent
    sending = iter(held)
    first = next(sending)
    assert response_cache._buffered.used > 0
    # Room for the held answer to be kept whole, never for a second one beside what it holds already (its first
    # piece is as large as the upstream's first send happened to be: a fixed limit let a busy machine keep both).
    monkeypatch.setattr(response_cache._buffered, "limit", response_cache._buffered.used + 99_999)
    second = gateway.get("/api/users/v1/other", headers={"X-API-Key": key})  # would pass the worker's buffer
    assert second.body == b"y" * 100_000
    assert gateway.get("/api/users/v1/other", headers={"X-API-Key": key}).header("X-Cache") == "MISS"
    assert len(first + b"".join(sending)) == 100_000
    held.close()
    assert gateway.get(url, headers={"X-API-Key": key}).header("X-Cache") == "HIT"
    assert response_cache._buffered.used == 0


def test_header_transforms_and_cors_are_applied_to_each_hit_for_its_own_caller(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    stamp = services.policy_create(
        tenant=acme,
        name="stamp",
        policy_type="headers",
        config={"response": {"set": {"X-Served-For": "{consumer_id}"}}},
        actor=None,
    )
    cors = services.policy_create(
        tenant=acme,
        name="browsers",
        policy_type="cors",
        config={"allow_origins": ["https://a.example.com", "https://b.example.com"]},
        actor=None,
    )
    api = _cached_api(acme, bob_app, upstream, stamp, cors)
    other_key = _second_consumer(acme, api)
    _counting(upstream, [("Cache-Control", "max-age=60")])
    bob = gateway.get(PATH, headers={"X-API-Key": key})
    carl = gateway.get(PATH, headers={"X-API-Key": other_key})
    assert (bob.header("X-Cache"), carl.header("X-Cache")) == ("MISS", "HIT")
    assert bob.header("X-Served-For") == bob_app.id
    carl_id = Consumer.objects.get(name="carl-app").id
    assert carl.header_all("X-Served-For") == [carl_id]  # rendered for this request, not bob's stored

    for origin in ("https://a.example.com", "https://b.example.com", "https://a.example.com"):
        answer = gateway.get("/api/users/v1/cors", headers={"X-API-Key": key, "Origin": origin})
        assert answer.header_all("Access-Control-Allow-Origin") == [origin]
        assert answer.header_all("Vary") == ["Origin"]
    assert answer.header("X-Cache") == "HIT"


def test_a_large_streamed_answer_is_stored_as_the_upstream_sent_it(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    stamp = services.policy_create(
        tenant=acme,
        name="stamp",
        policy_type="headers",
        config={"response": {"add": {"X-Served-For": "{consumer_id}"}}},
        actor=None,
    )
    api = _cached_api(acme, bob_app, upstream, stamp)
    other_key = _second_consumer(acme, api)
    upstream.respond = lambda seen: Answer(headers=[("Cache-Control", "max-age=60")], body=b"b" * 100_000)
    bob = gateway.get(PATH, headers={"X-API-Key": key})
    carl = gateway.get(PATH, headers={"X-API-Key": other_key})
    assert (bob.header("X-Cache"), carl.header("X-Cache")) == ("MISS", "HIT")
    assert carl.body == bob.body == b"b" * 100_000
    assert bob.header_all("X-Served-For") == [bob_app.id]
    assert carl.header_all("X-Served-For") == [Consumer.objects.get(name="carl-app").id]


def _entries() -> Iterator[bytes]:
    from apimgmt.redis_client import get_redis

    client = get_redis()
    assert client is not None
    for name in client.scan_iter("rc:*"):
        yield client.get(name)


def test_keys_carry_the_tenants_hash_tag(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder, redis_client: Any
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream)
    gateway.get(PATH, headers={"X-API-Key": key})
    names = [n.decode() for n in redis_client.scan_iter("rc:*")]
    assert len(names) == 1 and names[0].startswith("rc:{acme}:")
    assert 0 < redis_client.ttl(names[0]) <= 300


def test_hits_skip_the_rate_limit_only_when_the_policy_says_they_do_not_count(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    def limit() -> Policy:
        return services.policy_create(
            tenant=acme,
            name=f"two-{time.monotonic_ns()}",
            policy_type="rate_limiting",
            config={"requests_per_minute": 2},
            actor=None,
        )

    _counting(upstream, [("Cache-Control", "max-age=60")])
    _cached_api(acme, bob_app, upstream, limit(), count_hits_toward_quota=True)
    free = publish(
        acme,
        upstream.url,
        base_path="/api/free/v1",
        policies=[
            services.policy_create(
                tenant=acme,
                name="cache-free",
                policy_type="response_cache",
                config={"count_hits_toward_quota": False},
                actor=None,
            ),
            limit(),
        ],
    )
    subscribe(bob_app, free)

    statuses = [gateway.get(PATH, headers={"X-API-Key": key}).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]  # the hit counted
    answers = [gateway.get("/api/free/v1/items", headers={"X-API-Key": key}) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    assert [a.header("X-Cache") for a in answers] == ["MISS"] + ["HIT"] * 4
    assert gateway.get("/api/free/v1/other", headers={"X-API-Key": key}).status == 200  # a miss: counted (2nd)
    assert gateway.get("/api/free/v1/third", headers={"X-API-Key": key}).status == 429


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


def test_with_redis_stopped_requests_are_served_by_the_upstream_and_the_cache_comes_back_with_it(
    settings: Any, gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    port = free_port()
    proc = _redis_server(port)
    try:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        reset_redis()
        _cached_api(acme, bob_app, upstream)
        _counting(upstream, [("Cache-Control", "max-age=60")])
        gateway.get(PATH, headers={"X-API-Key": key})
        assert gateway.get(PATH, headers={"X-API-Key": key}).header("X-Cache") == "HIT"
    finally:
        proc.kill()
        proc.wait()
    answers = [gateway.get(PATH, headers={"X-API-Key": key}) for _ in range(3)]
    assert [(a.status, a.header("X-Cache")) for a in answers] == [(200, "BYPASS")] * 3
    assert [a.body for a in answers] == [b"answer 2", b"answer 3", b"answer 4"]

    proc = _redis_server(port)  # back, empty
    try:
        time.sleep(response_cache.BACKOFF_SECONDS + 0.1)
        answers = [gateway.get(PATH, headers={"X-API-Key": key}) for _ in range(2)]
        assert [(a.header("X-Cache"), a.body) for a in answers] == [("MISS", b"answer 5"), ("HIT", b"answer 5")]
    finally:
        proc.kill()
        proc.wait()


# -- several gunicorn workers --------------------------------------------------------------------------------------

WORKERS = 2


@pytest.fixture
def live_gateway(live_env: dict[str, str], tmp_path: Any) -> Iterator[str]:
    env = {
        **live_env,
        "GATEWAY_CONFIG_POLL_SECONDS": "0.2",
        "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    with gunicorn(env, workers=WORKERS, log_path=tmp_path / "gunicorn.log") as url:
        yield url


def test_fifty_concurrent_misses_make_one_upstream_request_per_worker_and_config_changes_purge(
    live_gateway: str, acme: Tenant, bob_app: Consumer, key: str
) -> None:
    with recording_upstream() as upstream:

        def slow(seen: Seen) -> Answer:
            if "slow" in seen.path:
                time.sleep(0.5)  # long enough for all fifty to arrive while the first fetch is out
            return Answer(headers=[("Cache-Control", "max-age=60")], body=f"answer {len(upstream.seen)}".encode())

        upstream.respond = slow
        policy = _cache_policy(acme)
        api = publish(acme, upstream.url, policies=_limited(acme, [policy]))
        subscribe(bob_app, api)
        headers = {"X-API-Key": key}
        deadline = time.monotonic() + 30  # each worker loads its route table (slow on a busy machine)
        while requests.get(live_gateway + "/api/users/v1/warm", headers=headers, timeout=30).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = len(upstream.seen)

        results: list[requests.Response] = []
        start = threading.Barrier(50)

        def client() -> None:
            start.wait()
            results.append(requests.get(live_gateway + "/api/users/v1/slow", headers=headers, timeout=30))

        threads = [threading.Thread(target=client) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fetched = len(upstream.seen) - before
        assert [r.status_code for r in results] == [200] * 50
        assert 1 <= fetched <= WORKERS, f"{fetched} upstream requests for 50 concurrent misses"
        assert sum(r.headers["X-Cache"] == "MISS" for r in results) == fetched
        assert len({r.content for r in results}) <= WORKERS
        # Both workers, each with its own route table, name the same entry: one key per URL, shared by the workers.
        store = get_redis()
        assert store is not None
        assert len(list(store.scan_iter("rc:{acme}:*"))) == 2  # /warm and /slow
        after = [requests.get(live_gateway + "/api/users/v1/slow", headers=headers, timeout=30) for _ in range(12)]
        assert {r.headers["X-Cache"] for r in after} == {"HIT"}

        services.policy_update(policy=Policy.objects.get(pk=policy.pk), config={"ttl_seconds": 120}, actor=None)
        deadline = time.monotonic() + 15
        while (
            requests.get(live_gateway + "/api/users/v1/slow", headers=headers, timeout=30).headers["X-Cache"] == "HIT"
        ):
            assert time.monotonic() < deadline, "the policy change did not purge the entry"
            time.sleep(0.05)


# -- conditional requests: 304 Not Modified from the cache -----------------------------------------------------------

MODIFIED = "Sun, 06 Nov 2022 08:49:37 GMT"
# The headers a 304 from the cache carries of the stored answer, as RFC 9110 §15.4.5 names them.
VALIDATORS = [
    ("ETag", '"v1"'),
    ("Cache-Control", "max-age=60"),
    ("Expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
    ("Vary", "Accept-Language"),
    ("Content-Location", "/api/users/v1/items/2"),
]
_LIMIT_HEADERS = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def _limit_header_names(answer: Any) -> list[str]:
    return sorted(name.lower() for name, _value in answer.headers if name.lower() in _LIMIT_HEADERS)


def test_a_conditional_get_naming_the_stored_etag_is_answered_304_from_the_cache_without_a_body(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [*VALIDATORS, ("Last-Modified", MODIFIED), ("X-Upstream-Note", "describes the body")])
    filled = gateway.get(PATH, headers={"X-API-Key": key})
    assert (filled.status, filled.header("X-Cache")) == (200, "MISS")

    for condition in ('"v1"', 'W/"v1"', '"v0", W/"v1"', '"a,b" , "v1"', "*"):  # weak comparison; any entry for *
        answer = gateway.get(PATH, headers={"X-API-Key": key, "If-None-Match": condition})
        assert (answer.status, answer.body, answer.header("X-Cache")) == (304, b"", "HIT"), condition
        for name, value in VALIDATORS:
            assert answer.header_all(name) == [value], (condition, name)
        assert answer.header("Date") == filled.header("Date")
        # What describes the body the client already holds is left out, Last-Modified too since there is an ETag.
        for name in ("Content-Type", "Content-Length", "X-Upstream-Note", "Last-Modified"):
            assert answer.header(name) is None, (condition, name)
        assert answer.header("Age") == "0"
        assert answer.header_all("X-Request-ID") not in ([], [filled.header("X-Request-ID")])
        assert len(answer.header_all("X-Request-ID")) == 1
        assert (
            _limit_header_names(answer) == _limit_header_names(filled) == (list(_LIMIT_HEADERS) if _Limits.on else [])
        )
    head = gateway.request("HEAD", PATH, headers={"X-API-Key": key, "If-None-Match": '"v1"'})
    assert (head.status, head.body, head.header("ETag"), head.header("Content-Length")) == (304, b"", '"v1"', None)

    for condition in ('"v2"', 'W/"v2"', '"V1"', "v1", '"v1" "v2"', '"v2", *'):  # another tag, or not a list of tags
        answer = gateway.get(PATH, headers={"X-API-Key": key, "If-None-Match": condition})
        assert (answer.status, answer.body, answer.header("X-Cache")) == (200, b"answer 1", "HIT"), condition
        assert answer.header("Content-Length") == "8" and answer.header("X-Upstream-Note") == "describes the body"
    assert len(upstream.seen) == 1


def test_if_modified_since_is_answered_304_when_the_stored_answer_is_not_newer_and_if_none_match_takes_precedence(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60"), ("Last-Modified", MODIFIED)])  # no ETag
    gateway.get(PATH, headers={"X-API-Key": key})

    def get(**conditions: str) -> tuple[int, bytes, str | None]:
        headers = {"X-API-Key": key, **{name.replace("_", "-"): value for name, value in conditions.items()}}
        answer = gateway.get(PATH, headers=headers)
        assert answer.header("X-Cache") == "HIT"
        return answer.status, answer.body, answer.header("Last-Modified")

    not_modified = (304, b"", MODIFIED)  # Last-Modified kept: the only validator the client has
    full = (200, b"answer 1", MODIFIED)
    assert get(If_Modified_Since=MODIFIED) == not_modified
    assert get(If_Modified_Since="Mon, 07 Nov 2022 00:00:00 GMT") == not_modified
    assert get(If_Modified_Since="Sunday, 06-Nov-22 08:49:37 GMT") == not_modified  # the obsolete RFC 850 form
    assert get(If_Modified_Since="Sun, 06 Nov 2022 08:49:36 GMT") == full  # a second too early: changed since
    assert get(If_Modified_Since="Fri, 01 Jan 2100 00:00:00 GMT") == full  # in the future: not a valid condition
    assert get(If_Modified_Since="yesterday") == full
    assert get(If_Modified_Since=f"{MODIFIED}, {MODIFIED}") == full  # two dates: ignored
    # If-None-Match decides alone when present, even against an If-Modified-Since that would match.
    assert get(If_None_Match='"v1"', If_Modified_Since=MODIFIED) == full
    assert get(If_None_Match="*", If_Modified_Since="Sun, 06 Nov 2022 08:49:36 GMT") == not_modified
    assert len(upstream.seen) == 1

    # Without Last-Modified the stored Date is the answer's time (RFC 9111 §4.3.2).
    _counting(upstream, [("Cache-Control", "max-age=60")])
    dated = gateway.get("/api/users/v1/dated", headers={"X-API-Key": key})
    date = dated.header("Date")
    assert date is not None and dated.header("Last-Modified") is None
    since = gateway.get("/api/users/v1/dated", headers={"X-API-Key": key, "If-Modified-Since": date})
    assert (since.status, since.body, since.header("X-Cache")) == (304, b"", "HIT")
    before = gateway.get("/api/users/v1/dated", headers={"X-API-Key": key, "If-Modified-Since": MODIFIED})
    assert (before.status, before.body) == (200, b"answer 2")


def test_a_stored_answer_other_than_2xx_is_sent_in_full_whatever_the_conditions(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder
) -> None:
    _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60"), ("ETag", '"gone"'), ("Last-Modified", MODIFIED)], status=404)
    gateway.get(PATH, headers={"X-API-Key": key})
    for conditions in ({"If-None-Match": '"gone"'}, {"If-None-Match": "*"}, {"If-Modified-Since": MODIFIED}):
        answer = gateway.get(PATH, headers={"X-API-Key": key, **conditions})
        assert (answer.status, answer.body, answer.header("X-Cache")) == (404, b"answer 1", "HIT")
    assert len(upstream.seen) == 1


def test_a_304_from_the_cache_is_recorded_with_its_status_and_no_body_bytes(
    gateway: InProcessGateway,
    acme: Tenant,
    bob_app: Consumer,
    key: str,
    upstream: Recorder,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = _cached_api(acme, bob_app, upstream)
    _counting(upstream, [("Cache-Control", "max-age=60"), ("ETag", '"v1"')])
    with caplog.at_level("INFO", logger="gateway.access"):
        gateway.get(PATH, headers={"X-API-Key": key})
        validated = gateway.get(PATH, headers={"X-API-Key": key, "If-None-Match": '"v1"'})
        gateway.request("HEAD", PATH, headers={"X-API-Key": key, "If-None-Match": '"v1"'})
    assert validated.status == 304
    line = next(r.__dict__ for r in caplog.records if r.__dict__.get("request_id") == validated.header("X-Request-ID"))
    assert (line["status"], line["upstream_ms"]) == (304, None)

    get_gateway().usage.flush()
    by_status: dict[int, list[int]] = {}
    for name in redis_client.scan_iter(f"{usage_buckets.tag('acme')}:m:*"):
        for field, value in redis_client.hgetall(name).items():
            dimension = usage_buckets.Dimension.parse(field.decode())
            assert dimension.api == api.id
            by_status[dimension.status] = usage_buckets.decode(value.decode())
    bytes_out = usage_buckets.REQUEST_METRICS.index("bytes_out")
    requests_ = usage_buckets.REQUEST_METRICS.index("request_count")
    assert sorted(by_status) == [200, 304]
    assert (by_status[200][requests_], by_status[200][bytes_out]) == (1, 8)
    assert (by_status[304][requests_], by_status[304][bytes_out]) == (2, 0)


def test_a_conditional_miss_goes_upstream_as_sent_and_the_upstreams_304_is_never_stored(
    gateway: InProcessGateway, acme: Tenant, bob_app: Consumer, key: str, upstream: Recorder, redis_client: Any
) -> None:
    _cached_api(acme, bob_app, upstream)

    def validating(seen: Seen) -> Answer:
        headers = [("Cache-Control", "max-age=60"), ("ETag", '"v1"')]
        if seen.headers.get("if-none-match") == '"v1"':
            return Answer(status=304, headers=headers, body=b"")
        return Answer(headers=[("Content-Type", "text/plain"), *headers], body=f"answer {len(upstream.seen)}".encode())

    upstream.respond = validating
    conditional = gateway.get(PATH, headers={"X-API-Key": key, "If-None-Match": '"v1"', "If-Modified-Since": MODIFIED})
    assert (conditional.status, conditional.body, conditional.header("X-Cache")) == (304, b"", "MISS")
    assert upstream.seen[0].headers["if-none-match"] == '"v1"'
    assert upstream.seen[0].headers["if-modified-since"] == MODIFIED
    assert list(redis_client.scan_iter("rc:*")) == []  # a 304 is no answer to keep

    plain = gateway.get(PATH, headers={"X-API-Key": key})
    assert (plain.status, plain.body, plain.header("X-Cache")) == (200, b"answer 2", "MISS")
    again = gateway.get(PATH, headers={"X-API-Key": key, "If-None-Match": '"v1"'})
    assert (again.status, again.header("X-Cache")) == (304, "HIT")
    assert len(upstream.seen) == 2
    assert response_cache.CACHEABLE_STATUSES.isdisjoint({206, 304})


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[int, dict[str, str], bytes]:
    """One response head from a keep-alive connection: its status, headers (lower-case names) and the bytes after it."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {buffer!r}"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice in {head!r}"
        headers[name.lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, rest


def test_gunicorns_worker_sends_the_caches_304_without_a_body_and_keeps_the_connection(
    live_gateway: str, acme: Tenant, bob_app: Consumer, key: str
) -> None:
    with recording_upstream() as upstream:
        _counting(upstream, [("Cache-Control", "max-age=60"), ("ETag", '"v1"')])
        _cached_api(acme, bob_app, upstream)
        host = live_gateway.removeprefix("http://")
        request = f"{{}} {PATH} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n{{}}\r\n"
        with socket.create_connection(tuple(host.split(":")), timeout=30) as sock:  # type: ignore[arg-type]
            deadline = time.monotonic() + 30  # the worker behind this connection loads its route table
            rest = b""
            while True:
                sock.sendall(request.format("GET", "").encode())
                status, filled, rest = _read_head(sock, rest)
                while len(rest) < int(filled["content-length"]):
                    rest += sock.recv(65536)
                rest = rest[int(filled["content-length"]) :]
                if status == 200:
                    break
                assert time.monotonic() < deadline, f"still {status}"
                time.sleep(0.05)
            # A conditional GET, a conditional HEAD and a plain GET, one after the other on one connection: a byte of
            # body or a wrong length after either 304 would show at the start of the next answer.
            sock.sendall(request.format("GET", 'If-None-Match: "v1"\r\n').encode())
            status, first, rest = _read_head(sock, rest)
            assert (status, rest) == (304, b"")
            assert (first["etag"], first["x-cache"], first["connection"]) == ('"v1"', "HIT", "keep-alive")
            assert "content-length" not in first and "transfer-encoding" not in first
            sock.sendall(request.format("HEAD", 'If-None-Match: W/"v1"\r\n').encode())
            status, second, rest = _read_head(sock, rest)
            assert (status, rest) == (304, b"")
            assert "content-length" not in second and "transfer-encoding" not in second
            sock.sendall(request.format("GET", "").encode())
            status, third, rest = _read_head(sock, rest)
            assert (status, third["x-cache"], third["content-length"]) == (200, "HIT", str(len(b"answer 1")))
            while len(rest) < len(b"answer 1"):
                rest += sock.recv(65536)
            assert rest == b"answer 1"
        assert len(upstream.seen) == 1
