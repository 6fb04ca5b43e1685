"""The policy types of issue 14 as the services see them: each config is normalised or refused with a message naming
the field; attachment rules (API only, one per API); JWT issuers and identities; IP lists that reach the gateway."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import redis
from django.core.exceptions import ValidationError

from apimgmt import selectors, services, validation
from apimgmt.invalidation import CONFIG_VERSION_KEY, identity_cache_hash, key_cache_name
from apimgmt.models import Api, ApiKey, AuditEvent, Consumer, ConsumerIdentity, JwtIssuer, Policy, Tenant
from apimgmt.selectors import KeyRecord

# One valid config per type, and what it becomes once normalised (defaults filled in, canonical spellings).
VALID = {
    "cors": (
        {"allow_origins": ["https://App.Example.com", "https://*.example.org:8443"], "allow_credentials": True},
        {
            "allow_origins": ["https://app.example.com", "https://*.example.org:8443"],
            "allow_methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
            "allow_headers": [],
            "expose_headers": [],
            "allow_credentials": True,
            "max_age": 600,
        },
    ),
    "ip_rules": (
        {"allow": ["10.0.0.0/8", "2001:db8::/32", "203.0.113.7"], "deny": ["10.1.0.0/16"]},
        {"allow": ["10.0.0.0/8", "2001:db8::/32", "203.0.113.7/32"], "deny": ["10.1.0.0/16"]},
    ),
    "headers": (
        {
            "request": {"set": {"X-Consumer": "{consumer_id}", "X-User": "{jwt.sub}"}, "remove": ["Cookie"]},
            "response": {"add": {"X-Served-By": "gateway {{edge}}"}},
        },
        {
            "request": {"add": {}, "set": {"X-Consumer": "{consumer_id}", "X-User": "{jwt.sub}"}, "remove": ["Cookie"]},
            "response": {"add": {"X-Served-By": "gateway {{edge}}"}, "set": {}, "remove": []},
        },
    ),
    "request_limits": (
        {"allowed_methods": ["get", "post"], "max_body_bytes": 1024},
        {"allowed_methods": ["GET", "POST"], "max_body_bytes": 1024},
    ),
    "response_cache": (
        {"ttl_seconds": 60, "vary_headers": ["Accept-Language"]},
        {
            "ttl_seconds": 60,
            "max_entry_bytes": 1_048_576,
            "per_consumer": False,
            "count_hits_toward_quota": True,
            "vary_headers": ["accept-language"],
        },
    ),
}


@pytest.mark.parametrize("policy_type", sorted(VALID))
def test_every_type_normalises_its_config_and_the_result_validates_unchanged(policy_type: str) -> None:
    given, expected = VALID[policy_type]
    normalised = validation.validate_policy_config(policy_type, given)
    assert normalised == expected
    assert validation.validate_policy_config(policy_type, normalised) == normalised


@pytest.mark.parametrize(
    ("policy_type", "config", "message"),
    [
        # CORS
        ("cors", {}, "allow_origins is required"),
        ("cors", {"allow_origin": ["*"]}, "allow_origin (did you mean `allow_origins`?)"),
        ("cors", {"allow_origins": []}, "allow_origins needs at least one origin"),
        ("cors", {"allow_origins": ["*"], "allow_credentials": True}, "allow_credentials cannot be true"),
        ("cors", {"allow_origins": ["https://a.example.com/"]}, "allow_origins[0]: 'https://a.example.com/' has more"),
        (
            "cors",
            {"allow_origins": ["ftp://a.example.com"]},
            "allow_origins[0]: 'ftp://a.example.com' is not an origin",
        ),
        ("cors", {"allow_origins": ["https://*.com"]}, "allow_origins[0]: 'https://*.com' matches a whole top-level"),
        ("cors", {"allow_origins": ["https://a.*.example.com"]}, "allow_origins[0]"),
        ("cors", {"allow_origins": ["*", "https://a.example.com"]}, "list it alone"),
        ("cors", {"allow_origins": ["*"], "max_age": 86_401}, "max_age must be an integer from 0 to 86400"),
        ("cors", {"allow_origins": ["*"], "allow_methods": ["GE T"]}, "allow_methods[0]: 'GE T' is not an HTTP method"),
        ("cors", {"allow_origins": ["*"], "allow_headers": ["X Bad"]}, "allow_headers[0]"),
        ("cors", {"allow_origins": ["*"], "allow_credentials": "yes"}, "allow_credentials must be true or false"),
        (
            "cors",
            {"allow_origins": ["https://a.example.com"], "allow_credentials": True, "expose_headers": ["*"]},
            "expose_headers cannot contain '*' with allow_credentials",
        ),
        # IP rules
        ("ip_rules", {}, "ip_rules config needs at least one CIDR in allow or deny"),
        ("ip_rules", {"allow": ["10.0.0.1/8"]}, "allow[0]: '10.0.0.1/8' has host bits set; the network is 10.0.0.0/8"),
        (
            "ip_rules",
            {"deny": ["2001:db8::1/32"]},
            "deny[0]: '2001:db8::1/32' has host bits set; the network is 2001:db8::/32",
        ),
        ("ip_rules", {"deny": ["300.1.1.1"]}, "deny[0]: '300.1.1.1' is not an IPv4 or IPv6 address"),
        ("ip_rules", {"allow": "10.0.0.0/8"}, "allow must be a list of CIDRs"),
        ("ip_rules", {"alow": ["10.0.0.0/8"]}, "alow (did you mean `allow`?)"),
        # Header transforms
        ("headers", {}, "headers config needs at least one header"),
        ("headers", {"request": {"set": {"X-A": "a\r\nX-Injected: 1"}}}, "request.set.X-A contains a line break"),
        ("headers", {"response": {"add": {"X-A": "a\nb"}}}, "response.add.X-A contains a line break"),
        ("headers", {"request": {"set": {"X-A": "a\x00b"}}}, "request.set.X-A contains the control character U+0000"),
        ("headers", {"request": {"set": {"X-A": "a\x1bb"}}}, "U+001B"),
        ("headers", {"request": {"set": {"Connection": "close"}}}, "request.set: 'Connection' is a hop-by-hop header"),
        ("headers", {"request": {"remove": ["Transfer-Encoding"]}}, "request.remove[0]: 'Transfer-Encoding' is a hop"),
        ("headers", {"response": {"set": {"Upgrade": "h2c"}}}, "response.set: 'Upgrade' is a hop-by-hop header"),
        ("headers", {"request": {"set": {"Host": "evil.example.com"}}}, "request.set: 'Host' names the upstream"),
        ("headers", {"request": {"remove": ["Authorization"]}}, "'Authorization' carries the caller's credential"),
        ("headers", {"request": {"set": {"X-API-Key": "x"}}}, "'X-API-Key' carries the caller's credential"),
        ("headers", {"request": {"set": {"X-Forwarded-For": "1.2.3.4"}}}, "'X-Forwarded-For' is set by the gateway"),
        ("headers", {"request": {"set": {"X-Request-ID": "1"}}}, "'X-Request-ID' is set by the gateway"),
        ("headers", {"response": {"set": {"Content-Length": "1"}}}, "'Content-Length' is set by the gateway"),
        ("headers", {"request": {"set": {"Bad Name": "1"}}}, "request.set: 'Bad Name' is not an HTTP header name"),
        (
            "headers",
            {"request": {"set": {"X-A": "{password}"}}},
            "request.set.X-A uses the unknown template {password}",
        ),
        ("headers", {"request": {"set": {"X-A": "{consumer_id"}}}, "request.set.X-A has an unmatched '{'"),
        ("headers", {"request": {"set": {"X-A": "x"}, "remove": ["x-a"]}}, "request.remove[0]: 'x-a' is also in"),
        ("headers", {"request": {"sett": {}}}, "sett (did you mean `set`?)"),
        ("headers", {"requests": {}}, "requests (did you mean `request`?)"),
        ("headers", {"request": {"set": {"X-A": 5}}}, "request.set.X-A must be a string"),
        # Request limits
        ("request_limits", {}, "request_limits config needs at least one of"),
        ("request_limits", {"max_body_bytes": -1}, "max_body_bytes must be an integer from 0"),
        ("request_limits", {"max_headers": 0}, "max_headers must be an integer from 1 to 1000"),
        ("request_limits", {"allowed_methods": []}, "allowed_methods needs at least one method"),
        ("request_limits", {"max_body_byte": 5}, "max_body_byte (did you mean `max_body_bytes`?)"),
        # Response cache
        ("response_cache", {"ttl_seconds": 0}, "ttl_seconds must be an integer from 1 to 86400"),
        ("response_cache", {"max_entry_bytes": 11 * 1024 * 1024}, "max_entry_bytes must be an integer from 1"),
        ("response_cache", {"per_consumer": 1}, "per_consumer must be true or false"),
        ("response_cache", {"vary_headers": ["Authorization"]}, "vary_headers[0]: 'Authorization' carries credentials"),
        ("response_cache", {"ttl_second": 5}, "ttl_second (did you mean `ttl_seconds`?)"),
        # Types
        ("firewall", {}, "policy_type must be one of rate_limiting, quota, cors, ip_rules, headers"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(policy_type: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validation.validate_policy_config(policy_type, config)
    assert message in exc.value.messages[0], exc.value.messages[0]


def test_cidr_lists_of_consumers_and_keys_show_the_network_of_a_typo() -> None:
    assert validation.validate_cidr_list(["192.0.2.0/24", "::1", "192.0.2.0/24"], "ip_allow") == [
        "192.0.2.0/24",
        "::1/128",
    ]
    with pytest.raises(ValidationError) as exc:
        validation.validate_cidr_list(["192.0.2.10/24"], "ip_deny")
    assert "ip_deny[0]: '192.0.2.10/24' has host bits set; the network is 192.0.2.0/24" in exc.value.messages[0]


# ---------------------------------------------------------------------------
# Attachment rules
# ---------------------------------------------------------------------------


def _policy(tenant: Tenant, name: str, policy_type: str) -> Policy:
    return services.policy_create(
        tenant=tenant, name=name, policy_type=policy_type, config=VALID[policy_type][0], actor=None
    )


@pytest.mark.parametrize("policy_type", ["cors", "request_limits", "response_cache"])
def test_a_plan_refuses_a_policy_that_applies_to_a_whole_api(acme: Tenant, policy_type: str) -> None:
    policy = _policy(acme, "browser", policy_type)
    with pytest.raises(ValidationError) as exc:
        services.plan_create(tenant=acme, name="gold", policies=[policy], actor=None)
    assert f"Policy 'browser' is a {policy_type} policy" in exc.value.message_dict["policies"][0]
    plan = services.plan_create(tenant=acme, name="gold", actor=None)
    with pytest.raises(ValidationError, match="attach it to the API, not to a plan"):
        services.plan_update(plan=plan, policies=[policy], actor=None)


@pytest.mark.parametrize("policy_type", ["ip_rules", "headers"])
def test_a_plan_takes_ip_rules_and_header_transforms(acme: Tenant, policy_type: str) -> None:
    policy = _policy(acme, "subscribers", policy_type)
    plan = services.plan_create(tenant=acme, name="gold", policies=[policy], actor=None)
    assert list(plan.policies.all()) == [policy]


@pytest.mark.parametrize("policy_type", ["cors", "request_limits", "response_cache"])
def test_an_api_takes_one_policy_of_a_single_type_and_the_error_names_the_second(
    acme: Tenant, acme_api: Api, policy_type: str
) -> None:
    first, second = _policy(acme, "a-first", policy_type), _policy(acme, "b-second", policy_type)
    services.api_update(api=acme_api, policies=[first], actor=None)
    with pytest.raises(ValidationError) as exc:
        services.api_update(api=acme_api, policies=[first, second], actor=None)
    assert f"Policy 'b-second' is a second {policy_type} policy on this API" in exc.value.message_dict["policies"][0]
    assert list(acme_api.policies.all()) == [first]


def test_a_header_transform_never_touches_the_apis_own_key_header(acme: Tenant, acme_api: Api) -> None:
    policy = services.policy_create(
        tenant=acme,
        name="strip",
        policy_type="headers",
        config={"request": {"remove": ["X-Partner-Key"]}},
        actor=None,
    )
    services.api_update(api=acme_api, policies=[policy], actor=None)
    # The API moving its key to that header is refused, and so is the policy reaching for the API's key header.
    with pytest.raises(ValidationError, match="'X-Partner-Key', the header this API reads keys from"):
        services.api_update(api=acme_api, key_header="X-Partner-Key", actor=None)
    services.api_update(api=acme_api, key_header="X-Other-Key", actor=None)
    with pytest.raises(ValidationError, match="'X-Other-Key', the header this API reads keys from"):
        services.policy_update(policy=policy, config={"request": {"set": {"X-Other-Key": "x"}}}, actor=None)


# ---------------------------------------------------------------------------
# JWT issuers
# ---------------------------------------------------------------------------


def _rsa_public_jwk(kid: str) -> dict[str, str]:
    """A real RSA public key as a JWK (made here: no key material is checked in)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()

    def b64(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    return {"kty": "RSA", "kid": kid, "n": b64(numbers.n), "e": b64(numbers.e)}


RSA_JWK = _rsa_public_jwk("k1")


def _issuer(tenant: Tenant, name: str = "idp", **overrides: Any) -> JwtIssuer:
    settings: dict[str, Any] = {
        "issuer": "https://id.example.com/",
        "audiences": ["orders"],
        "public_keys": {"keys": [RSA_JWK]},
        **overrides,
    }
    return services.jwt_issuer_create(tenant=tenant, name=name, actor=None, **settings)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"algorithms": ["none"]}, "algorithms", "cannot include 'none'"),
        ({"algorithms": ["HS256"]}, "algorithms", "cannot include 'HS256': only public-key signatures"),
        ({"algorithms": ["RS256", "XX1"]}, "algorithms", "'XX1' is not one of RS256"),
        ({"algorithms": ["ES256"]}, "algorithms", "None of algorithms ES256 fits the keys in public_keys (RSA)"),
        ({"leeway_seconds": 301}, "leeway_seconds", "leeway_seconds must be an integer from 0 to 300"),
        ({"audiences": []}, "audiences", "audiences needs at least one non-empty value"),
        ({"issuer": "id.example.com"}, "issuer", "issuer must be an http(s) URL"),
        ({"public_keys": None}, "jwks_url", "Set jwks_url (where the issuer publishes its keys) or public_keys"),
        ({"jwks_url": "https://93.184.215.14/jwks"}, "public_keys", "not both"),
        ({"public_keys": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "public_keys", "a symmetric key (kty oct)"),
        ({"public_keys": {"keys": [{**RSA_JWK, "d": "secret"}]}}, "public_keys", "holds private key material (d)"),
        ({"public_keys": {"keys": [{"kty": "RSA", "kid": "k"}]}}, "public_keys", "(RSA) lacks n, e"),
        ({"public_keys": {"keys": [RSA_JWK, RSA_JWK]}}, "public_keys", "kid 'k1' is used by another key"),
        ({"public_keys": [RSA_JWK]}, "public_keys", "public_keys must be a JWKS document"),
        (
            {"public_keys": {"keys": [{"kty": "RSA", "kid": "k", "n": "AA", "e": "AQAB"}]}},
            "public_keys",
            "public_keys.keys[0] is not a usable public key",
        ),
        (
            {"public_keys": {"keys": [{"kty": "EC", "kid": "k", "crv": "P-999", "x": "AA", "y": "AA"}]}},
            "public_keys",
            "public_keys.keys[0] is not a usable public key: Unsupported crv",
        ),
        ({"consumer_claim": "sub claim"}, "consumer_claim", "consumer_claim must be a claim name"),
        ({"token_in_query": "access token"}, "token_in_query", "token_in_query may use letters"),
        (
            {"public_keys": None, "jwks_url": "http://127.0.0.1:8080/jwks"},
            "jwks_url",
            "jwks_url host '127.0.0.1' is a loopback, private, link-local or metadata address",
        ),
        ({"public_keys": None, "jwks_url": "file:///etc/passwd"}, "jwks_url", "jwks_url must start with http"),
    ],
)
def test_an_issuer_setting_is_refused_naming_its_field(
    acme: Tenant, overrides: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        _issuer(acme, **overrides)
    assert any(message in m for m in exc.value.message_dict[field]), exc.value.message_dict


def test_an_issuer_is_audited_and_reaches_the_route_snapshot_with_the_api(
    acme: Tenant, acme_api: Api, django_assert_num_queries: Any
) -> None:
    issuer = _issuer(acme, algorithms=["RS256", "PS256"], consumer_claim="client_id", token_in_query="access_token")
    with pytest.raises(ValidationError) as exc:
        services.api_update(api=acme_api, auth_method="jwt", actor=None)
    assert "needs at least one JWT issuer" in exc.value.message_dict["jwt_issuers"][0]
    services.api_update(api=acme_api, auth_method="key_or_jwt", jwt_issuers=[issuer], actor=None)

    with django_assert_num_queries(5):
        snapshot = selectors.route_snapshot()
    route = snapshot.routes[0]
    assert route.auth_method == "key_or_jwt" and route.validation == "off"
    assert route.jwt_issuers == (selectors.issuer_spec(issuer),)
    spec = route.jwt_issuers[0]
    assert spec.tenant_id == "acme" and spec.audiences == ("orders",) and spec.algorithms == ("RS256", "PS256")
    assert spec.public_keys == {"keys": [RSA_JWK]} and spec.leeway_seconds == 30
    assert spec.consumer_claim == "client_id" and spec.token_in_query == "access_token"
    event = AuditEvent.objects.get(action="jwt_issuer.create", object_id=issuer.pk)
    assert event.changes["public_keys"] == ["k1"]  # kids only
    update = AuditEvent.objects.get(action="api.update", object_id=acme_api.pk)
    assert update.changes["jwt_issuers"] == [[], [issuer.pk]]


def test_an_api_takes_only_its_own_tenants_issuers(acme_api: Api, globex: Tenant) -> None:
    foreign = _issuer(globex)
    with pytest.raises(ValidationError) as exc:
        services.api_update(api=acme_api, jwt_issuers=[foreign], actor=None)
    assert foreign.pk in exc.value.message_dict["jwt_issuers"][0]


def test_an_issuer_in_use_cannot_be_deleted_and_takes_its_identities_when_free(
    acme: Tenant,
    acme_api: Api,
    bob_app: Consumer,
    redis_client: redis.Redis,
    django_capture_on_commit_callbacks: Any,
) -> None:
    issuer = _issuer(acme)
    services.api_update(api=acme_api, auth_method="jwt", jwt_issuers=[issuer], actor=None)
    identity = services.consumer_identity_create(consumer=bob_app, issuer=issuer, external_id="user-1", actor=None)
    with pytest.raises(services.DeletionRefused, match="accepted by 1 API \\(users\\)"):
        services.jwt_issuer_delete(issuer=issuer, actor=None)
    services.api_update(api=acme_api, auth_method="key", jwt_issuers=[], actor=None)
    version = int(redis_client.get(CONFIG_VERSION_KEY) or 0)
    with django_capture_on_commit_callbacks(execute=True):
        services.jwt_issuer_delete(issuer=issuer, actor=None)
    assert not ConsumerIdentity.objects.filter(pk=identity.pk).exists()
    assert int(redis_client.get(CONFIG_VERSION_KEY) or 0) == version + 1
    assert redis_client.get(key_cache_name(identity_cache_hash(issuer.pk, "user-1"))) == b"evicted"
    assert AuditEvent.objects.get(action="jwt_issuer.delete").changes["identities_deleted"] == 1


def test_an_external_id_belongs_to_one_consumer_per_issuer(acme: Tenant, bob_app: Consumer, globex: Tenant) -> None:
    issuer = _issuer(acme)
    other = services.consumer_create(tenant=acme, name="other", actor=None)
    identity = services.consumer_identity_create(consumer=bob_app, issuer=issuer, external_id="user-1", actor=None)
    with pytest.raises(ValidationError, match="Another consumer already has external ID 'user-1'"):
        services.consumer_identity_create(consumer=other, issuer=issuer, external_id="user-1", actor=None)
    with pytest.raises(ValidationError, match="Unknown JWT issuer"):
        services.consumer_identity_create(consumer=bob_app, issuer=_issuer(globex), external_id="x", actor=None)
    record = selectors.identity_record(issuer.pk, "user-1")
    assert record is not None and record.consumer_id == bob_app.pk
    assert record.key_id == identity.pk and record.key_prefix == ""  # no key: each identity counted apart
    assert selectors.identity_record(issuer.pk, "nobody") is None


# ---------------------------------------------------------------------------
# IP lists of consumers and keys
# ---------------------------------------------------------------------------


def test_ip_lists_reach_the_key_record_and_a_change_evicts_the_key_everywhere(
    bob_app: Consumer,
    bob_key: tuple[ApiKey, str],
    redis_client: redis.Redis,
    django_capture_on_commit_callbacks: Any,
) -> None:
    key = bob_key[0]
    with django_capture_on_commit_callbacks(execute=True):
        services.consumer_update(consumer=bob_app, ip_allow=["198.51.100.0/24"], actor=None)
    assert redis_client.get(key_cache_name(key.key_hash)) == b"evicted"
    redis_client.delete(key_cache_name(key.key_hash))
    with django_capture_on_commit_callbacks(execute=True):
        services.api_key_update(key=key, ip_deny=["198.51.100.7", "2001:db8::/48"], actor=None)
    assert redis_client.get(key_cache_name(key.key_hash)) == b"evicted"

    record = selectors.key_record_by_hash(key.key_hash)
    assert record is not None
    assert record.consumer_ip_allow == ("198.51.100.0/24",) and record.consumer_ip_deny == ()
    assert record.key_ip_allow == () and record.key_ip_deny == ("198.51.100.7/32", "2001:db8::/48")
    assert KeyRecord.from_json(record.to_json()) == record
    assert AuditEvent.objects.get(action="api_key.update").changes == {
        "ip_deny": [[], ["198.51.100.7/32", "2001:db8::/48"]]
    }

    with pytest.raises(ValidationError) as exc:
        services.consumer_update(consumer=bob_app, ip_deny=["198.51.100.7/24"], actor=None)
    assert "the network is 198.51.100.0/24" in exc.value.message_dict["ip_deny"][0]
    services.api_key_revoke(key=key, actor=None)
    with pytest.raises(ValidationError, match="A revoked key cannot be changed"):
        services.api_key_update(key=key, ip_allow=[], actor=None)


def test_a_key_record_cached_before_the_ip_lists_existed_still_reads() -> None:
    cached = {
        "key_id": "key_1",
        "key_prefix": "ak_live_abcd",
        "consumer_id": "con_1",
        "tenant_id": "acme",
        "active": True,
        "revoked": False,
        "expires_at": None,
        "consumer_active": True,
        "subscriptions": {"api_1": ""},
        "last_used_at": None,
    }
    record = KeyRecord.from_json(cached)
    assert record.consumer_ip_allow == () and record.key_ip_deny == ()
    # And a field a newer control plane added is ignored rather than fatal during a rolling deploy.
    assert KeyRecord.from_json({**cached, "some_future_field": 1}) == record


def test_existing_rows_keep_working_with_the_defaults(acme: Tenant, acme_api: Api, bob_key: tuple[ApiKey, str]) -> None:
    api = Api.objects.get(pk=acme_api.pk)
    assert api.auth_method == "key" and api.validation == "off" and not api.jwt_issuers.exists()
    key = ApiKey.objects.select_related("consumer").get(pk=bob_key[0].pk)
    assert key.ip_allow == [] and key.ip_deny == [] and key.consumer.ip_allow == []
