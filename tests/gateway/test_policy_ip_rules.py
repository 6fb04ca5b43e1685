"""ip_rules: allow and deny lists of CIDRs on the client address the gateway trusts, per API, plan, consumer and key."""

from __future__ import annotations

from typing import Any

import pytest

from apimgmt import selectors, services
from apimgmt.keys import hash_key
from apimgmt.models import Api, Consumer, Policy, Tenant
from gateway.chain import Exchange, Finished
from gateway.policies import ip_rules
from gateway.wsgi import get_gateway
from tests.gateway.conftest import InProcessGateway, publish, reload_routes, subscribe
from tests.gateway.upstreams import Recorder

pytestmark = pytest.mark.django_db

PATH = "/api/users/v1/x"


def _rules(tenant: Tenant, name: str = "office", **config: Any) -> Policy:
    mode = config.pop("mode", Policy.Mode.ENFORCE)
    return services.policy_create(
        tenant=tenant, name=name, policy_type="ip_rules", config=config, actor=None, mode=mode
    )


def _api(tenant: Tenant, upstream: Recorder, consumer: Consumer, *policies: Policy, plan: Any = None) -> Api:
    api = publish(tenant, upstream.url, policies=list(policies), plans=[plan] if plan else [])
    subscribe(consumer, api, plan)
    return api


def _get(gateway: InProcessGateway, key: str | None, addr: str, **headers: str) -> Any:
    sent = dict(headers)
    if key:
        sent["X-API-Key"] = key
    return gateway.get(PATH, headers=sent, remote_addr=addr)


def _refused(response: Any, address: str) -> str:
    assert response.status == 403, response.body
    assert response.header("Content-Type") == "application/problem+json"
    document = response.json()
    assert document["type"].endswith("ip-refused")
    assert document["client_ip"] == address
    assert f"Requests from {address} are refused" in document["detail"]
    return str(document["detail"])


def test_an_api_deny_list_refuses_its_addresses_with_403_naming_the_address_before_any_key_is_looked_at(
    gateway, acme, upstream, bob_app, key
):
    _api(acme, upstream, bob_app, _rules(acme, deny=["203.0.113.0/24"]))
    detail = _refused(_get(gateway, key, "203.0.113.7"), "203.0.113.7")
    assert "this API's IP rules (policy 'office')" in detail and "deny list" in detail
    # no key at all: still the IP refusal, not a 401 (the rule runs before authentication)
    _refused(_get(gateway, None, "203.0.113.8"), "203.0.113.8")
    assert upstream.seen == []
    assert _get(gateway, key, "198.51.100.1").status == 200
    assert len(upstream.seen) == 1


def test_a_non_empty_allow_list_refuses_everything_outside_it(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _rules(acme, allow=["192.0.2.0/24", "198.51.100.10"]))
    assert _get(gateway, key, "192.0.2.200").status == 200
    assert _get(gateway, key, "198.51.100.10").status == 200
    detail = _refused(_get(gateway, key, "198.51.100.11"), "198.51.100.11")
    assert "not in the allow list" in detail
    _refused(_get(gateway, key, "127.0.0.1"), "127.0.0.1")
    assert len(upstream.seen) == 2


def test_deny_wins_over_allow(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _rules(acme, allow=["10.0.0.0/8"], deny=["10.9.0.0/16"]))
    assert _get(gateway, key, "10.1.2.3").status == 200
    _refused(_get(gateway, key, "10.9.8.7"), "10.9.8.7")


def test_behind_a_trusted_proxy_the_forwarded_client_is_checked(
    gateway, settings_gateway, acme, upstream, bob_app, key
):
    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    _api(acme, upstream, bob_app, _rules(acme, allow=["192.0.2.0/24"]))
    # the proxy (10.0.0.5, trusted) says the client is 192.0.2.9: allowed, although the proxy itself is not
    assert _get(gateway, key, "10.0.0.5", **{"X-Forwarded-For": "192.0.2.9"}).status == 200
    # a client outside the list behind the same proxy: refused, naming the client, not the proxy
    _refused(_get(gateway, key, "10.0.0.5", **{"X-Forwarded-For": "203.0.113.4"}), "203.0.113.4")
    # hops of trusted proxies are walked: the first untrusted one is the client
    assert _get(gateway, key, "10.0.0.5", **{"X-Forwarded-For": "192.0.2.9, 10.3.3.3"}).status == 200


def test_without_trusted_proxies_the_peer_is_checked(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _rules(acme, deny=["10.0.0.0/8"]))
    # no proxy is trusted: a forwarded address is never believed
    _refused(_get(gateway, key, "10.0.0.5", **{"X-Forwarded-For": "192.0.2.9"}), "10.0.0.5")


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    gateway, settings_gateway, acme, upstream, bob_app, key
):
    settings_gateway(TRUSTED_PROXIES=["10.0.0.0/8"])
    _api(acme, upstream, bob_app, _rules(acme, allow=["192.0.2.0/24"], deny=["198.51.100.0/24"]))
    # 198.51.100.7 is not a trusted proxy: its claim to be 192.0.2.9 is ignored, and it is denied as itself
    response = _get(gateway, key, "198.51.100.7", **{"X-Forwarded-For": "192.0.2.9"})
    detail = _refused(response, "198.51.100.7")
    assert "deny list" in detail
    # an address outside the allow list cannot pose as an allowed one either
    _refused(_get(gateway, key, "203.0.113.50", **{"X-Forwarded-For": "192.0.2.9"}), "203.0.113.50")
    assert upstream.seen == []


def test_ipv6_addresses_and_networks(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app, _rules(acme, allow=["2001:db8::/32", "192.0.2.0/24"], deny=["2001:db8:bad::/48"]))
    assert _get(gateway, key, "2001:db8::1").status == 200
    assert _get(gateway, key, "2001:DB8:0:0::2").status == 200  # any spelling of the address
    _refused(_get(gateway, key, "2001:db9::1"), "2001:db9::1")
    _refused(_get(gateway, key, "2001:db8:bad::1"), "2001:db8:bad::1")
    # an IPv4-mapped IPv6 peer (a dual-stack listener) is the IPv4 address it maps
    assert _get(gateway, key, "::ffff:192.0.2.7").status == 200
    _refused(_get(gateway, key, "::ffff:203.0.113.7"), "::ffff:203.0.113.7")


def test_every_policy_of_an_api_must_pass(gateway, acme, upstream, bob_app, key):
    _api(
        acme,
        upstream,
        bob_app,
        _rules(acme, "corporate", allow=["10.0.0.0/8"]),
        _rules(acme, "no-lab", deny=["10.66.0.0/16"]),
    )
    assert _get(gateway, key, "10.1.1.1").status == 200
    assert "policy 'no-lab'" in _refused(_get(gateway, key, "10.66.1.1"), "10.66.1.1")
    assert "policy 'corporate'" in _refused(_get(gateway, key, "192.0.2.1"), "192.0.2.1")


def test_a_plan_policy_applies_to_that_plans_subscribers_only(gateway, acme, upstream, bob_app, key, bob):
    partner = services.plan_create(
        tenant=acme, name="partner", actor=None, policies=[_rules(acme, allow=["192.0.2.0/24"])]
    )
    free = services.plan_create(tenant=acme, name="free", actor=None)
    api = publish(acme, upstream.url, plans=[partner, free])
    subscribe(bob_app, api, partner)
    other = services.consumer_create(tenant=acme, name="other app", actor=None, owner=bob)
    subscribe(other, api, free)
    _, other_key = services.api_key_create(consumer=other, actor=None)
    detail = _refused(_get(gateway, key, "203.0.113.1"), "203.0.113.1")
    assert "your plan's IP rules (policy 'office')" in detail
    assert _get(gateway, key, "192.0.2.1").status == 200
    assert _get(gateway, other_key, "203.0.113.1").status == 200  # the free plan has no rule


def test_shadow_mode_lets_the_request_through(gateway, acme, upstream, bob_app, key, caplog):
    _api(acme, upstream, bob_app, _rules(acme, deny=["203.0.113.0/24"], mode=Policy.Mode.SHADOW))
    with caplog.at_level("INFO", logger="gateway.policies.ip_rules"):
        assert _get(gateway, key, "203.0.113.7").status == 200
    assert "would have refused 203.0.113.7" in caplog.text


def test_a_policy_that_cannot_be_compiled_refuses_traffic_with_503(gateway, acme, upstream, bob_app, key, caplog):
    policy = _rules(acme, allow=["192.0.2.0/24"])
    _api(acme, upstream, bob_app, policy)
    # an old row written before validation existed (or edited in the database)
    Policy.objects.filter(pk=policy.pk).update(config={"allow": ["192.0.2.0/24", "not a network"]})
    with caplog.at_level("ERROR", logger="gateway.policies.ip_rules"):
        response = _get(gateway, key, "192.0.2.1")
    assert response.status == 503
    assert response.json()["type"].endswith("ip-rules-unavailable")
    assert "policy 'office'" in response.json()["detail"]
    assert "cannot be compiled" in caplog.text
    assert upstream.seen == []


def test_the_route_of_an_api_without_ip_rules_has_no_ip_step(gateway, acme, upstream, bob_app, key):
    _api(acme, upstream, bob_app)
    assert _get(gateway, key, "203.0.113.7").status == 200
    route = get_gateway().routes.current().resolve("", PATH)
    assert route is not None and route.chain.empty


# -- a consumer's and a key's own lists (check_caller, called by the authenticate step) ---------------------------


def _exchange_for(plaintext: str, client_ip: str, api: Api) -> Exchange:
    record = selectors.key_record_by_hash(hash_key(plaintext))
    assert record is not None
    get_gateway().routes.current()
    route = get_gateway().routes.current().resolve("", PATH)
    assert route is not None and route.api_id == api.pk
    ex = Exchange(get_gateway(), {}, route, "GET", PATH, "", "req-1", client_ip, Finished("req-1", "GET", 0.0))
    ex.record = record
    return ex


def test_key_and_consumer_lists_refuse_outside_addresses(gateway, acme, upstream, bob, bob_app):
    api = _api(acme, upstream, bob_app)
    services.consumer_update(consumer=bob_app, actor=None, ip_deny=["203.0.113.0/24"])
    _, plaintext = services.api_key_create(consumer=bob_app, actor=None, ip_allow=["192.0.2.0/24", "2001:db8::/32"])
    assert ip_rules.has_caller_lists(_exchange_for(plaintext, "192.0.2.1", api))
    assert ip_rules.check_caller(_exchange_for(plaintext, "192.0.2.1", api)) is None
    assert ip_rules.check_caller(_exchange_for(plaintext, "2001:db8::5", api)) is None
    refused = ip_rules.check_caller(_exchange_for(plaintext, "198.51.100.1", api))
    assert refused is not None and refused.status_code == 403
    assert b"your key's IP rules" in b"".join(refused.body)
    # the consumer's deny list holds for every key of the app, whatever the key's allow list says
    services.consumer_update(consumer=bob_app, actor=None, ip_deny=["192.0.2.128/25"])
    refused = ip_rules.check_caller(_exchange_for(plaintext, "192.0.2.200", api))
    assert refused is not None and b"your app's IP rules" in b"".join(refused.body)


def test_a_caller_without_lists_costs_a_look_at_four_empty_fields(gateway, acme, upstream, bob_app, key):
    api = _api(acme, upstream, bob_app)
    ex = _exchange_for(key, "203.0.113.1", api)
    assert not ip_rules.has_caller_lists(ex)
    assert ip_rules.check_caller(ex) is None


def test_a_keys_own_list_refuses_through_the_gateway_before_limits_count(gateway, acme, upstream, bob_app):
    limit = services.policy_create(
        tenant=acme, name="per-minute", policy_type="rate_limiting", config={"requests_per_minute": 100}, actor=None
    )
    api = _api(acme, upstream, bob_app)
    services.api_update(api=api, actor=None, policies=[limit])
    _, plaintext = services.api_key_create(consumer=bob_app, actor=None, ip_allow=["192.0.2.0/24"])
    inside = gateway.get(PATH, headers={"X-API-Key": plaintext}, remote_addr="192.0.2.7")
    assert inside.status == 200
    before = int(inside.header("X-RateLimit-Remaining") or 0)
    outside = gateway.get(PATH, headers={"X-API-Key": plaintext}, remote_addr="198.51.100.9")
    assert outside.status == 403
    assert "198.51.100.9" in outside.json()["detail"]
    again = gateway.get(PATH, headers={"X-API-Key": plaintext}, remote_addr="192.0.2.7")
    assert int(again.header("X-RateLimit-Remaining") or 0) == before - 1  # the refused call was never counted


def test_a_keys_allow_list_is_applied_to_real_requests_after_authentication(gateway, acme, upstream, bob_app):
    _api(acme, upstream, bob_app)
    _, plaintext = services.api_key_create(consumer=bob_app, actor=None, ip_allow=["192.0.2.0/24"])
    assert _get(gateway, plaintext, "192.0.2.9").status == 200
    detail = _refused(_get(gateway, plaintext, "198.51.100.9"), "198.51.100.9")
    assert "your key's IP rules" in detail
    assert len(upstream.seen) == 1


def test_a_changed_plan_policy_applies_once_the_route_table_reloads(gateway, acme, upstream, bob_app, key):
    policy = _rules(acme, allow=["192.0.2.0/24"])
    plan = services.plan_create(tenant=acme, name="partner", actor=None, policies=[policy])
    _api(acme, upstream, bob_app, plan=plan)
    assert _get(gateway, key, "192.0.2.1").status == 200
    services.policy_update(policy=policy, actor=None, config={"allow": ["198.51.100.0/24"]})
    reload_routes()
    _refused(_get(gateway, key, "192.0.2.1"), "192.0.2.1")
    assert _get(gateway, key, "198.51.100.1").status == 200


def test_networks_are_merged_and_mapped_ipv6_networks_count_as_ipv4() -> None:
    networks = ip_rules.NetworkSet(["10.0.0.0/9", "10.128.0.0/9", "::ffff:192.0.2.0/120", "2001:db8::/126"])
    inside = ["10.0.0.0", "10.127.255.255", "10.128.0.0", "10.255.255.255", "192.0.2.5", "::ffff:192.0.2.6"]
    outside = ["9.255.255.255", "11.0.0.0", "192.0.3.0", "2001:db8::4", "::ffff:11.0.0.0", "::"]
    assert all(networks.contains(ip_rules.parse_address(a)) for a in inside)  # type: ignore[arg-type]
    assert not any(networks.contains(ip_rules.parse_address(a)) for a in outside)  # type: ignore[arg-type]
    assert ip_rules.parse_address("unknown") is None and ip_rules.parse_address("") is None
