"""Static files (admin CSS, API docs assets) are served by the app itself in production (DEBUG off)."""

from __future__ import annotations

import urllib.request

from tests.support.servers import gunicorn


def test_static_files_are_served_with_debug_off(live_env: dict[str, str]) -> None:
    with gunicorn(live_env, workers=1) as base:
        for path in ("/static/admin/css/base.css", "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css"):
            with urllib.request.urlopen(base + path, timeout=10) as response:
                assert response.status == 200, path
                assert "text/css" in response.headers["Content-Type"]
                assert len(response.read()) > 1000
