"""docker-compose's nginx never writes an API key to its access log.

Keys may come in the query string (an API's key_query_param, or ``apikey`` on a WebSocket handshake, where
browsers cannot set headers); the access log line names the path, never the query.
"""

from __future__ import annotations

from pathlib import Path

import requests

from apimgmt import keys
from tests.deploy.test_nginx import _nginx
from tests.gateway.upstreams import recording_upstream


def test_a_key_in_the_query_string_is_not_in_nginx_s_access_log(tmp_path: Path) -> None:
    key = keys.generate_key()
    with (
        recording_upstream() as gateway,
        recording_upstream() as control,
        _nginx(tmp_path, gateway.port, control.port) as url,
    ):
        response = requests.get(f"{url}/api/chat/v1/socket?apikey={key}&room=7", timeout=10)
        assert response.status_code == 200
        assert gateway.seen, "nginx did not pass the request on"
    log = (tmp_path / "nginx.log").read_text()
    assert "GET /api/chat/v1/socket HTTP/1.1" in log  # the request is still logged, by its path
    assert key not in log and "room=7" not in log
