"""Gateway test helpers: an in-process gateway called as WSGI, and APIs wired to loopback upstreams."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections

from apimgmt import services
from apimgmt.models import Api, ApiKey, Consumer, Plan, Policy, Tenant
from gateway.wsgi import GatewayApplication, get_gateway, reset_gateway
from tests.gateway.upstreams import Recorder, recording_upstream


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class InProcessGateway:
    """Calls apimgmt's WSGI application (gateway first, Django behind) in the test's thread and DB transaction."""

    def __init__(self) -> None:
        reset_gateway()
        self.app = GatewayApplication(get_wsgi_application())

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        remote_addr: str = "127.0.0.1",
        host: str = "testserver",
        chunked: bool = False,
        environ_extra: dict[str, Any] | None = None,
    ) -> Response:
        """One request; ``chunked`` sends the body as gunicorn hands over a chunked upload (decoded, no length);
        ``environ_extra`` adds or replaces environ entries (a socket's file as wsgi.input, gunicorn.socket ...)."""
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "RAW_URI": target,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": remote_addr,
            "HTTP_HOST": host,
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": io.StringIO(),
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        if chunked:
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        elif body:
            environ["CONTENT_LENGTH"] = str(len(body))
        environ.update(environ_extra or {})
        for name, value in (headers or {}).items():
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value
            else:
                environ["HTTP_" + key] = value
        captured: dict[str, Any] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"] = int(status.split(" ", 1)[0])
            captured["headers"] = response_headers

        # Like Django's test client: keep the test's transaction open across requests that reach Django.
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            iterable = self.app(environ, start_response)
            try:
                data = b"".join(iterable)
            finally:
                close = getattr(iterable, "close", None)
                if close:
                    close()
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)
        return Response(captured["status"], captured["headers"], data)

    def get(self, target: str, **kwargs: Any) -> Response:
        return self.request("GET", target, **kwargs)


@pytest.fixture
def gateway() -> Iterator[InProcessGateway]:
    gw = InProcessGateway()
    yield gw
    reset_gateway()


@pytest.fixture
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@pytest.fixture
def settings_gateway(settings: Any) -> Callable[..., None]:
    def apply(**values: Any) -> None:
        settings.GATEWAY = {**settings.GATEWAY, **values}

    return apply


@pytest.fixture(autouse=True)
def _allow_private_upstreams(settings: Any, tmp_path: Any) -> None:
    settings.UPSTREAM_ALLOW_PRIVATE = True
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_SPOOL_DIR": str(tmp_path / "spool")}


def publish(
    tenant: Tenant,
    upstream_url: str,
    *,
    base_path: str = "/api/users/v1",
    policies: list[Policy] = (),  # type: ignore[assignment]
    **options: Any,
) -> Api:
    options.setdefault("status", "active")
    return services.api_create(
        tenant=tenant,
        api_name=options.pop("api_name", base_path.strip("/").replace("/", "-")),
        base_path=base_path,
        upstream_url=upstream_url,
        actor=None,
        policies=list(policies),
        **options,
    )


def subscribe(consumer: Consumer, api: Api, plan: Plan | None = None) -> None:
    services.subscription_request(consumer=consumer, api=api, plan=plan, actor=None)


@pytest.fixture
def key(bob_key: tuple[ApiKey, str]) -> str:
    return bob_key[1]


@pytest.fixture
def users_api(acme: Tenant, upstream: Recorder, bob_app: Consumer, bob: User) -> Api:
    """acme's /api/users/v1 in front of the recording upstream, bob's app subscribed."""
    api = publish(acme, upstream.url + "/svc")
    subscribe(bob_app, api)
    return api


@pytest.fixture
def fresh_cache_worker_state() -> Iterator[None]:
    """The response cache's per-worker memory (Redis back-off, Vary names, fetches in flight, streamed answers
    held) empty before and after the test: an earlier test's body that was never closed would still hold its share
    of the buffer, or a Redis failure its back-off."""
    from gateway.policies import response_cache

    def empty() -> None:
        response_cache._health.down_until = 0.0
        response_cache._buffered.used = 0
        response_cache._vary_memo.clear()
        response_cache._inflight.clear()

    empty()
    yield
    empty()


def reload_routes() -> None:
    """Load this process's route table now, from the configuration version in Redis. ``routes.reload()`` alone
    loads the version its poller thread last saw, which may not be the change the test just made yet."""
    routes = get_gateway().routes
    routes.seen_version = None  # reload() then reads the version itself
    routes.reload()
