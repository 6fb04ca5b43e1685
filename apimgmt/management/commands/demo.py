"""`manage.py demo`: load (idempotently) a demo tenant, admin, API, plan, consumer, subscription and key."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from apimgmt import keys, services
from apimgmt.ids import BASE62
from apimgmt.models import Api, ApiKey, ApiToken, Consumer, Plan, Policy, Subscription, Tenant, TenantMembership

TENANT_ID = "demo"
ADMIN_USERNAME = "admin"
API_BASE_PATH = "/demo/echo"
DEFAULT_UPSTREAM = "http://127.0.0.1:8081"


def _derived(label: str, length: int) -> str:
    """A stable secret for the demo, derived from SECRET_KEY, so re-running `demo` prints the same values."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"apimgmt-demo:{label}".encode(), hashlib.sha512).digest()
    number = int.from_bytes(digest, "big")
    chars = []
    for _ in range(length):
        number, rem = divmod(number, 62)
        chars.append(BASE62[rem])
    return "".join(chars)


def demo_key() -> str:
    body = keys.KEY_PREFIX + _derived("api-key", keys.KEY_RANDOM_LENGTH)
    return body + keys.checksum(body)


class Command(BaseCommand):
    help = "Load a demo tenant, admin user, API (in front of the echo upstream), consumer, subscription and key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object with the credentials.")
        parser.add_argument("--upstream", default=DEFAULT_UPSTREAM, help=f"Upstream URL (default {DEFAULT_UPSTREAM}).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = self._load(upstream=options["upstream"])
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(result))
        else:
            for name, value in result.items():
                self.stdout.write(f"{name}: {value}")

    @transaction.atomic
    def _load(self, *, upstream: str) -> dict[str, str]:
        password = _derived("admin-password", 20)
        admin, created = User.objects.get_or_create(
            username=ADMIN_USERNAME, defaults={"email": "admin@example.com", "is_staff": True, "is_superuser": True}
        )
        if created or not admin.check_password(password):
            admin.is_staff = admin.is_superuser = True
            admin.set_password(password)
            admin.save()

        tenant = Tenant.objects.filter(pk=TENANT_ID).first() or services.tenant_create(
            id=TENANT_ID, name="Demo Corp", open_signup=True, actor=admin
        )
        services.membership_set(tenant=tenant, user=admin, role=TenantMembership.Role.ADMIN, actor=admin)

        rate = Policy.objects.filter(tenant=tenant, name="demo-rate-limit").first() or services.policy_create(
            tenant=tenant,
            name="demo-rate-limit",
            policy_type="rate_limiting",
            config={
                "requests_per_second": 100,
                "requests_per_minute": 3000,
                "burst_size": 50,
                "key_extraction": "consumer_id",
            },
            actor=admin,
        )
        quota = Policy.objects.filter(tenant=tenant, name="demo-daily-quota").first() or services.policy_create(
            tenant=tenant,
            name="demo-daily-quota",
            policy_type="quota",
            config={"requests_per_day": 100000, "key_extraction": "consumer_id"},
            actor=admin,
        )
        plan = Plan.objects.filter(tenant=tenant, name="free").first() or services.plan_create(
            tenant=tenant, name="free", description="Free tier: 100,000 requests a day.", policies=[quota], actor=admin
        )

        api = Api.objects.filter(tenant=tenant, base_path=API_BASE_PATH).first()
        if api is None:
            api = services.api_create(
                tenant=tenant,
                api_name="echo",
                description="Echoes the request it receives, as JSON.",
                base_path=API_BASE_PATH,
                upstream_url=upstream,
                status=Api.Status.ACTIVE,
                policies=[rate],
                plans=[plan],
                openapi_spec=ECHO_OPENAPI,
                actor=admin,
            )
        elif api.upstream_url != upstream:
            services.api_update(api=api, upstream_url=upstream, actor=admin)
        if not api.plans.exists():
            services.api_update(api=api, plans=[plan], actor=admin)
        if api.status != Api.Status.ACTIVE:
            services.api_activate(api=api, actor=admin)

        consumer = Consumer.objects.filter(tenant=tenant, name="demo-app").first() or services.consumer_create(
            tenant=tenant, name="demo-app", owner=admin, actor=admin
        )
        if not Subscription.objects.filter(consumer=consumer, api=api, status=Subscription.Status.ACTIVE).exists():
            services.subscription_request(consumer=consumer, api=api, plan=plan, actor=admin)

        plaintext = demo_key()
        key_hash = keys.hash_key(plaintext)
        if not ApiKey.objects.filter(key_hash=key_hash).exists():
            key = ApiKey(
                consumer=consumer,
                name="demo",
                key_prefix=keys.display_prefix(plaintext),
                key_hash=key_hash,
            )
            key.save(force_insert=True)
            services.audit_record(
                actor=admin, tenant_id=tenant.id, action="api_key.create", obj=key, changes={"name": "demo"}
            )

        token = "amt_" + _derived("api-token", 40)
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        if not ApiToken.objects.filter(token_hash=token_hash).exists():
            ApiToken.objects.create(user=admin, name="demo", token_prefix=token[:12], token_hash=token_hash)

        site = settings.SITE_URL.rstrip("/")
        return {
            "admin_username": ADMIN_USERNAME,
            "admin_password": password,
            "api_token": token,
            "api_key": plaintext,
            "api_base_path": API_BASE_PATH,
            "portal_url": f"{site}/portal/{TENANT_ID}/",
        }


ECHO_OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Echo", "version": "1.0.0", "description": "Answers with the request it received."},
    "servers": [{"url": API_BASE_PATH}],
    "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
    "security": [{"apiKey": []}],
    "paths": {
        "/{path}": {
            "get": {
                "summary": "Echo a GET request",
                "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The request as JSON (method, path, query, headers, body)."}},
            },
            "post": {
                "summary": "Echo a POST request",
                "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "The request as JSON, body included."}},
            },
        }
    },
}
