"""WebSocket handshakes authenticated with a JWT, through the gateway under gunicorn to a `websockets` upstream.

What gateway.jwt_auth reads on a handshake is what it reads on any request: ``Authorization: Bearer <token>``, or
the query parameter an issuer names in ``token_in_query`` (the way left to a browser, which cannot set headers on
a WebSocket). A ``Sec-WebSocket-Protocol`` entry carries API keys only (``apikey.<key>``), never a token.
"""
# ruff: noqa: F811  (the fixtures of tests/gateway/test_websocket.py and jwt_support.py are imported by name)

from __future__ import annotations

import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from apimgmt import services
from apimgmt.models import Api, Consumer, JwtIssuer, Tenant
from tests.gateway.conftest import publish
from tests.gateway.jwt_support import AUD, ISS, SigningKey, bearer, k1, publish_for_tokens  # noqa: F401 (fixtures)
from tests.gateway.test_websocket import WsUpstream, live_gateway, ws_upstream  # noqa: F401 (fixtures)

PATH = "/api/users/v1"


def _issuer(tenant: Tenant, key: SigningKey, **options: Any) -> JwtIssuer:
    """An issuer whose key is inline: the gateway's workers verify without fetching anything."""
    return services.jwt_issuer_create(
        tenant=tenant,
        name="acme-id",
        issuer=ISS,
        audiences=[AUD],
        public_keys={"keys": [key.jwk]},
        actor=None,
        **options,
    )


def _ws_api(tenant: Tenant, consumer: Consumer, upstream: WsUpstream, issuer: JwtIssuer, **options: Any) -> Api:
    return publish_for_tokens(tenant, upstream.url + "/svc", consumer, issuer, websocket=True, **options)


def _connect(url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 5)
    return connect(url, additional_headers=headers, proxy=None, ping_interval=None, legacy=True, **kwargs)


def _wait_routable(url: str, headers: dict[str, str], timeout: float = 30) -> None:
    """Until both workers have loaded the API (a handshake succeeds several times in a row)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            for _ in range(6):
                with _connect(url, headers):
                    pass
            return
        except (InvalidStatus, OSError):
            time.sleep(0.1)
    raise AssertionError("the API never became routable")


def _refused(url: str, headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(InvalidStatus) as caught:
        _connect(url, headers)
    return caught.value.response


def _echoes(ws: ClientConnection) -> None:
    ws.send("héllo")
    assert ws.recv(timeout=5) == "héllo"
    ws.send(b"\x00\x01\xff" * 100)
    assert ws.recv(timeout=5) == b"\x00\x01\xff" * 100


def _no_credential_upstream(handshake: tuple[str, dict[str, str], str | None], token: str) -> None:
    path, headers, _ = handshake
    assert "authorization" not in headers
    assert token not in path
    assert all(token not in value for value in headers.values())


@pytest.mark.parametrize("auth_method", ["jwt", "key_or_jwt"])
def test_a_bearer_token_opens_the_connection_and_never_reaches_the_upstream(
    live_gateway, acme, bob_app, ws_upstream, k1, auth_method
):
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1), auth_method=auth_method)
    url = live_gateway + PATH + "/echo?x=1"
    token = k1.token(exp=int(time.time()) + 600)
    _wait_routable(url, bearer(token))
    with _connect(url, bearer(token)) as ws:
        _echoes(ws)
        ws.close(1000, "done")
    assert ws.close_code == 1000
    handshake = ws_upstream.handshakes[-1]
    path, headers, _ = handshake
    assert path == "/svc/echo?x=1"
    assert headers["x-consumer-id"] == bob_app.id
    assert headers["x-tenant-id"] == acme.id
    _no_credential_upstream(handshake, token)


@pytest.mark.parametrize("auth_method", ["jwt", "key_or_jwt"])
def test_an_expired_or_wrong_audience_token_gets_401_before_any_upgrade(
    live_gateway, acme, bob_app, ws_upstream, k1, auth_method
):
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1), auth_method=auth_method)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(k1.token(exp=int(time.time()) + 600)))
    count = len(ws_upstream.handshakes)
    now = int(time.time())
    for token, detail in (
        (k1.token(exp=now - 120), b"has expired"),
        (k1.token(aud="another-api"), b"audience (aud)"),
    ):
        response = _refused(url, bearer(token))
        assert response.status_code == 401
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="')
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert detail in response.body
        assert token.encode() not in response.body
    assert len(ws_upstream.handshakes) == count  # the upstream never heard of them


def test_a_browser_sends_the_token_in_the_issuers_query_parameter_and_the_upstream_never_sees_it(
    live_gateway, acme, bob_app, ws_upstream, k1
):
    # new WebSocket("wss://…/echo?access_token=" + token): a browser can set no Authorization header.
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1, token_in_query="access_token"))
    token = k1.token(exp=int(time.time()) + 600)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(token))
    with _connect(f"{url}?x=1&access_token={token}&y=2", origin="https://app.example.com") as ws:
        _echoes(ws)
    handshake = ws_upstream.handshakes[-1]
    assert handshake[0] == "/svc/echo?x=1&y=2"
    assert handshake[1]["x-consumer-id"] == bob_app.id
    _no_credential_upstream(handshake, token)
    expired = k1.token(exp=int(time.time()) - 120)
    count = len(ws_upstream.handshakes)
    response = _refused(f"{url}?access_token={expired}")
    assert response.status_code == 401 and b"has expired" in response.body
    assert len(ws_upstream.handshakes) == count


def test_a_token_in_the_query_is_refused_where_the_issuer_does_not_allow_it(
    live_gateway, acme, bob_app, ws_upstream, k1
):
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1))
    token = k1.token(exp=int(time.time()) + 600)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(token))
    count = len(ws_upstream.handshakes)
    response = _refused(f"{url}?access_token={token}")
    assert response.status_code == 401
    assert b"does not accept tokens in the query" in response.body
    assert len(ws_upstream.handshakes) == count


def test_a_token_in_a_subprotocol_entry_is_not_a_credential(live_gateway, acme, bob_app, ws_upstream, k1):
    """The protocol entry "apikey.<value>" is read as an API key: a token there does not authenticate."""
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1))
    token = k1.token(exp=int(time.time()) + 600)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(token))
    count = len(ws_upstream.handshakes)
    with pytest.raises(InvalidStatus) as caught:
        _connect(url, subprotocols=["apikey", f"apikey.{token}"])
    assert caught.value.response.status_code == 401
    assert len(ws_upstream.handshakes) == count


# A token connection is filed and re-checked under its identity (issuer, subject), never as an API key.


def test_a_token_connection_stays_open_when_another_api_of_the_tenant_is_published(
    live_gateway, acme, bob_app, bob_key, ws_upstream, k1
):
    """A change of the route table re-checks every open connection's caller; a token's caller is still allowed,
    as the API key's beside it is."""
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1), auth_method="key_or_jwt")
    token = k1.token(exp=int(time.time()) + 600)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(token))
    with _connect(url, bearer(token)) as by_token, _connect(url, {"X-API-Key": bob_key[1]}) as by_key:
        _echoes(by_token)
        _echoes(by_key)
        publish(acme, ws_upstream.url + "/svc", base_path="/api/other")  # a new route table for every worker
        time.sleep(1.5)  # the config poll (0.2 s) and the housekeeper's next ticks
        _echoes(by_key)
        assert by_token.close_code is None, (by_token.close_code, by_token.close_reason)
        _echoes(by_token)


def test_blocking_the_consumer_closes_its_token_connections_with_1008(live_gateway, acme, bob_app, ws_upstream, k1):
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1))
    token = k1.token(exp=int(time.time()) + 600)
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(token))
    with _connect(url, bearer(token)) as ws:
        _echoes(ws)
        blocked_at = time.monotonic()
        services.consumer_block(consumer=bob_app, actor=None)
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=5)
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 1008
    assert time.monotonic() - blocked_at < 1.5
    # A new handshake may land on the other worker, which hears of the block within about a second too.
    deadline = time.monotonic() + 3
    while True:
        try:
            with _connect(url, bearer(k1.token(jti=f"after-{time.monotonic_ns()}"))):
                pass
        except InvalidStatus as refused:
            response = refused.response
            break
        assert time.monotonic() < deadline, "a blocked consumer's new token still connects"
        time.sleep(0.1)
    assert response.status_code == 403 and b"is blocked" in response.body


def test_a_token_connection_is_closed_with_1008_when_the_token_expires(live_gateway, acme, bob_app, ws_upstream, k1):
    _ws_api(acme, bob_app, ws_upstream, _issuer(acme, k1, leeway_seconds=0))
    url = live_gateway + PATH + "/echo"
    _wait_routable(url, bearer(k1.token(exp=int(time.time()) + 600)))
    expires = int(time.time()) + 3
    with _connect(url, bearer(k1.token(exp=expires))) as ws:
        _echoes(ws)  # valid while it lasts
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=10)
    assert caught.value.rcvd is not None
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (1008, "The token expired.")
    assert expires <= time.time() < expires + 2.5
