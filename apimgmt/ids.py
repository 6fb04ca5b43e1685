"""Prefixed random primary keys (api_…, con_…, key_…) and the base62 alphabet they share with API keys."""

from __future__ import annotations

import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_RANDOM_LENGTH = 20


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_id(prefix: str) -> str:
    """A new primary key such as ``api_3kT9…``: the prefix, an underscore and 20 base62 characters."""
    return f"{prefix}_{random_base62(ID_RANDOM_LENGTH)}"


# Module-level defaults for primary key fields (migrations reference them by name).
def new_api_id() -> str:
    return new_id("api")


def new_target_id() -> str:
    return new_id("tgt")


def new_consumer_id() -> str:
    return new_id("con")


def new_key_id() -> str:
    return new_id("key")


def new_policy_id() -> str:
    return new_id("pol")


def new_plan_id() -> str:
    return new_id("pln")


def new_subscription_id() -> str:
    return new_id("sub")


def new_event_id() -> str:
    return new_id("evt")


def new_jwt_issuer_id() -> str:
    return new_id("jwi")


def new_identity_id() -> str:
    return new_id("cid")


def new_webhook_endpoint_id() -> str:
    return new_id("whk")
