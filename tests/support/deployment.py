"""The whole product on loopback: an echo upstream, an API in front of it, and the app under gunicorn."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from apimgmt import echo, services
from apimgmt.models import Api, Consumer, Tenant
from tests.support.servers import gunicorn, wsgi_server


@dataclass
class Deployment:
    base: str
    env: dict[str, str]
    api: Api
    key_id: str
    key: str


def _ready(base: str) -> bool:
    try:
        return requests.get(f"{base}/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def deployed_gateway(
    env: dict[str, str], tenant: Tenant, consumer: Consumer, tmp_path: Path, *, workers: int = 2
) -> Iterator[Deployment]:
    """gunicorn (our gunicorn.conf.py) with `workers` workers; /echo/v1 proxies to the echo app; consumer subscribed."""
    import time

    with wsgi_server(echo.app) as upstream:
        api = services.api_create(
            tenant=tenant, api_name="echo", base_path="/echo/v1", upstream_url=upstream, status="active", actor=None
        )
        services.subscription_request(consumer=consumer, api=api, actor=None)
        key, plaintext = services.api_key_create(consumer=consumer, name="e2e", actor=None)
        full_env = {
            **env,
            "USAGE_SPOOL_DIR": str(tmp_path / "spool"),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
        with gunicorn(full_env, workers=workers) as base:
            deadline = time.monotonic() + 20
            while not _ready(base):
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateway never became ready")
                time.sleep(0.1)
            yield Deployment(base, full_env, api, key.key_id, plaintext)
