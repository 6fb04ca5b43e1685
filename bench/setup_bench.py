"""Create the benchmark's tenant, APIs, consumer and key; print what the bench's targets need as JSON.

/bench: key auth and a two-window rate limit that is never reached (the row every other row is compared with).
/bench-jwt: the same behind JWT auth (RS256, an inline public key; one token, repeated).
/bench-edge: key auth plus CORS, an IP allow list and header transforms both ways.
/bench-cache: key auth plus the response cache (upstream answers carry max-age).
/bench-post and /bench-validate: a 2 KB JSON POST; the second checks it against a 300-operation OpenAPI 3.0 document
(validation: enforce), the first has the same document and no validation.
"""

from __future__ import annotations

import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apimgmt.settings")
django.setup()

from apimgmt import services, usage_buckets  # noqa: E402
from apimgmt.models import Api, Consumer, JwtIssuer, Policy, Tenant  # noqa: E402
from apimgmt.redis_client import get_redis  # noqa: E402


def main(upstream: str) -> None:
    client = get_redis()
    if client is not None:
        # The bench runs no usage flusher (it would share the two cores): drop earlier runs' usage buckets (a few
        # per minute of traffic) from the bench's Redis db.
        stale = list(client.scan_iter(f"{usage_buckets.tag('bench')}:*"))
        if stale:
            client.delete(*stale)
    tenant = Tenant.objects.filter(pk="bench").first() or services.tenant_create(id="bench", name="Bench", actor=None)
    policy_ = Policy.objects.filter(tenant=tenant, name="bench-limit").first() or services.policy_create(
        tenant=tenant,
        name="bench-limit",
        policy_type="rate_limiting",
        config={"requests_per_second": 1_000_000, "requests_per_minute": 60_000_000, "burst_size": 1000},
        actor=None,
    )
    Api.objects.filter(tenant=tenant).delete()
    JwtIssuer.objects.filter(tenant=tenant).delete()
    api = services.api_create(
        tenant=tenant,
        api_name="bench",
        base_path="/bench",
        upstream_url=upstream,
        status="active",
        policies=[policy_],
        actor=None,
    )
    consumer = services.consumer_create(tenant=tenant, name=f"bench-{api.id}", actor=None)
    services.subscription_request(consumer=consumer, api=api, actor=None)
    _, key = services.api_key_create(consumer=consumer, actor=None)
    out: dict[str, str] = {"key": key, "base_path": api.base_path}

    def policy(name: str, policy_type: str, config: dict[str, object]) -> Policy:
        return services.policy_create(tenant=tenant, name=name, policy_type=policy_type, config=config, actor=None)

    Policy.objects.filter(tenant=tenant).exclude(pk=policy_.pk).delete()
    edge = services.api_create(
        tenant=tenant,
        api_name="bench-edge",
        base_path="/bench-edge",
        upstream_url=upstream,
        status="active",
        policies=[
            policy_,
            policy("bench-cors", "cors", {"allow_origins": ["https://app.example.com"], "expose_headers": ["X-Trace"]}),
            policy("bench-ip", "ip_rules", {"allow": ["127.0.0.0/8", "::1/128"]}),
            policy(
                "bench-headers",
                "headers",
                {
                    "request": {"set": {"X-Caller": "{consumer_id}"}, "remove": ["X-Debug"]},
                    "response": {"set": {"X-Trace": "{request_id}"}},
                },
            ),
        ],
        actor=None,
    )
    services.subscription_request(consumer=consumer, api=edge, actor=None)
    out["edge_base_path"] = edge.base_path
    cache = services.api_create(
        tenant=tenant,
        api_name="bench-cache",
        base_path="/bench-cache",
        upstream_url=upstream,
        status="active",
        policies=[policy_, policy("bench-cache", "response_cache", {"ttl_seconds": 3600})],
        actor=None,
    )
    services.subscription_request(consumer=consumer, api=cache, actor=None)
    out["cache_base_path"] = cache.base_path
    out.update(_jwt_api(tenant, upstream, policy_, consumer))
    for name, validation in (("bench-post", "off"), ("bench-validate", "enforce")):
        api = services.api_create(
            tenant=tenant,
            api_name=name,
            base_path=f"/{name}",
            upstream_url=upstream,
            status="active",
            policies=[policy_],
            openapi_spec=_spec(operations=300, version="3.0.3"),  # most documents in use are 3.0
            validation=validation,
            actor=None,
        )
        services.subscription_request(consumer=consumer, api=api, actor=None)
        out[f"{name.removeprefix('bench-')}_base_path"] = api.base_path
    print(json.dumps(out))


def _spec(operations: int, version: str = "3.1.0") -> dict[str, object]:
    """An OpenAPI document (3.1 unless ``version`` says "3.0.3": the schemas mean the same in both) of ``operations``
    operations (GET and POST on operations/2 paths); POSTs take an Item."""
    paths: dict[str, object] = {}
    for i in range(operations // 2):
        paths[f"/r{i}/items"] = {
            "get": {
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": {"description": "ok"}},
            },
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}},
                },
                "responses": {"200": {"description": "ok"}},
            },
        }
    item = {
        "type": "object",
        "required": ["name", "qty"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "qty": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "maxItems": 50, "items": {"type": "string", "maxLength": 40}},
            "notes": {"type": "string", "maxLength": 4000},
        },
    }
    return {
        "openapi": version,
        "info": {"title": "bench", "version": "1"},
        "paths": paths,
        "components": {"schemas": {"Item": item}},
    }


def _jwt_api(tenant: Tenant, upstream: str, limit: Policy, consumer: Consumer) -> dict[str, str]:
    """An RS256 issuer with an inline public key, the API that accepts it, and one long-lived token."""
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    public_jwk.update({"kid": "bench-1", "alg": "RS256", "use": "sig"})
    issuer = services.jwt_issuer_create(
        tenant=tenant,
        name="bench-idp",
        issuer="https://idp.bench.example/",
        audiences=["bench-api"],
        public_keys={"keys": [public_jwk]},
        algorithms=["RS256"],
        actor=None,
    )
    services.consumer_identity_create(consumer=consumer, issuer=issuer, external_id="bench-client", actor=None)
    api = services.api_create(
        tenant=tenant,
        api_name="bench-jwt",
        base_path="/bench-jwt",
        upstream_url=upstream,
        status="active",
        policies=[limit],
        auth_method="jwt",
        jwt_issuers=[issuer],
        actor=None,
    )
    services.subscription_request(consumer=consumer, api=api, actor=None)
    now = int(time.time())
    token = jwt.encode(
        {"iss": issuer.issuer, "aud": "bench-api", "sub": "bench-client", "iat": now, "exp": now + 86_400},
        private,
        algorithm="RS256",
        headers={"kid": "bench-1"},
    )
    return {"jwt_base_path": api.base_path, "jwt_token": token}


if __name__ == "__main__":
    main(sys.argv[1])
