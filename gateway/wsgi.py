"""The gateway as WSGI middleware around Django: API traffic never builds a Django request."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gateway.pipeline import Gateway

CHECKED = "apimgmt.gateway_checked"
# Set for requests asking to upgrade: this server can hand the connection over to gateway.websocket.
RELAY = "apimgmt.websocket_relay"
_gateway: Gateway | None = None


def get_gateway() -> Gateway:
    """This worker's gateway (created on first use, after the fork)."""
    global _gateway
    if _gateway is None:
        _gateway = Gateway()
    return _gateway


def reset_gateway() -> None:
    """Forget the worker's gateway (tests that change settings between cases)."""
    global _gateway
    if _gateway is not None:
        _gateway.stop()
    _gateway = None


class GatewayApplication:
    """Serve paths under an API's base_path from the gateway; hand every other request to ``app`` untouched."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "HTTP_UPGRADE" in environ:
            environ[RELAY] = True
        result = get_gateway().handle(environ)
        if result is None:
            environ[CHECKED] = True  # GatewayMiddleware need not look at it again
            return self.app(environ, start_response)
        if result.status == "101 Switching Protocols":
            # An accepted WebSocket handshake (gateway.websocket.Upgrade): the connection is taken over from here.
            return result.run(environ)  # type: ignore[attr-defined]
        start_response(result.status, result.headers)
        return result.body
