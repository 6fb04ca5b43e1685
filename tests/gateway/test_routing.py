"""Routing: request-target hygiene, longest base_path on segment boundaries, hosts, statuses."""

from __future__ import annotations

import pytest

from apimgmt import services
from tests.gateway.conftest import publish, subscribe

BAD_PATHS = [
    "/api/users/v1/../admin",
    "/api/users/v1/%2e%2e/admin",
    "/api/users/v1/%2E%2e/admin",
    "/api/users/v1/x/%2E%2e/",
    "/api/users/v1/.%2e/x",
    "/api/users/v1/./x",
    "/api/users/v1/x%2Fy",
    "/api/users/v1/x%2f..%2fy",
    "/api/users/v1/x%5Cy",
    "/api/users/v1/x\\y",
    "/api/users/v1/x%00y",
    "/api/users/v1/x%0ay",
    "/api/users/v1//x",
    "/api/users/v1/%C0%AE%C0%AE/x",  # overlong UTF-8 for '..'
    "/api/users/v1/%ff",
    "/api/users/v1/%zz",
    # Path parameters do not hide a dot segment (Tomcat, Jetty and Spring read "..;x" as "..").
    "/api/users/v1/..;/..;/admin",
    "/api/users/v1/x/..;jsessionid=1/admin",
    "/api/users/v1/.;/admin",
    "/api/users/v1/..%3b/admin",
    "/api/users/v1/..%3B/admin",
    # Double (and triple) encoding: one more decoding upstream would make a dot or a slash of them.
    "/api/users/v1/%252e%252e/admin",
    "/api/users/v1/%252E%252E/admin",
    "/api/users/v1/x%252fy",
    "/api/users/v1/x%255cy",
    "/api/users/v1/%25252e%25252e/admin",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_unnormalised_paths_are_refused_with_400_and_never_reach_the_upstream(gateway, users_api, upstream, key, path):
    response = gateway.get(path, headers={"X-API-Key": key})
    assert response.status == 400
    assert response.header("Content-Type") == "application/problem+json"
    body = response.json()
    assert body["status"] == 400
    assert body["type"].endswith("bad-path")
    assert upstream.seen == []


def test_path_parameters_and_single_escapes_that_are_not_dots_still_pass(gateway, users_api, upstream, key):
    for path in ["/api/users/v1/a;v=1/b", "/api/users/v1/...;x", "/api/users/v1/a..;/b", "/api/users/v1/100%25"]:
        assert gateway.get(path, headers={"X-API-Key": key}).status == 200, path
    assert upstream.paths == ["/svc/a;v=1/b", "/svc/...;x", "/svc/a..;/b", "/svc/100%25"]


def test_the_double_encoding_refusal_names_what_to_fix(gateway, users_api, key):
    response = gateway.get("/api/users/v1/%252e%252e/admin", headers={"X-API-Key": key})
    assert response.status == 400
    assert "double-encoded" in response.json()["detail"]
    response = gateway.get("/api/users/v1/..;/admin", headers={"X-API-Key": key})
    assert "path parameters" in response.json()["detail"]


def test_prefix_must_end_on_a_segment_boundary(gateway, users_api, upstream, key):
    assert gateway.get("/api/users/v10", headers={"X-API-Key": key}).status == 404
    assert gateway.get("/api/users/v1x/a", headers={"X-API-Key": key}).status == 404
    assert upstream.seen == []
    assert gateway.get("/api/users/v1", headers={"X-API-Key": key}).status == 200
    assert gateway.get("/api/users/v1/", headers={"X-API-Key": key}).status == 200
    assert gateway.get("/api/users/v1/a/b?x=1&y=%2F", headers={"X-API-Key": key}).status == 200
    assert upstream.paths == ["/svc", "/svc/", "/svc/a/b?x=1&y=%2F"]


def test_upstream_never_sees_a_path_outside_its_prefix(gateway, users_api, upstream, key):
    for path in [*BAD_PATHS, "/api/users/v1/a/b", "/api/users/v1/%75sers", "/api/users/v1/caf%C3%A9"]:
        gateway.get(path, headers={"X-API-Key": key})
    assert upstream.paths == ["/svc/a/b", "/svc/users", "/svc/caf%C3%A9"]
    assert all(p.startswith("/svc/") and "/../" not in p for p in upstream.paths)


def test_longest_base_path_wins(gateway, acme, upstream, bob_app, key):
    outer = publish(acme, upstream.url + "/outer", base_path="/api")
    inner = publish(acme, upstream.url + "/inner", base_path="/api/users/v1")
    subscribe(bob_app, outer)
    subscribe(bob_app, inner)
    gateway.get("/api/users/v1/me", headers={"X-API-Key": key})
    gateway.get("/api/users/v2/me", headers={"X-API-Key": key})
    assert upstream.paths == ["/inner/me", "/outer/users/v2/me"]


def test_an_api_bound_to_the_host_beats_one_without(gateway, acme, upstream, bob_app, key):
    generic = publish(acme, upstream.url + "/generic", base_path="/api/users/v1")
    hosted = publish(acme, upstream.url + "/hosted", base_path="/api", host="api.acme.test")
    subscribe(bob_app, generic)
    subscribe(bob_app, hosted)
    gateway.get("/api/users/v1/x", headers={"X-API-Key": key}, host="api.acme.test:443")
    gateway.get("/api/users/v1/x", headers={"X-API-Key": key}, host="other.test")
    assert upstream.paths == ["/hosted/users/v1/x", "/generic/x"]


def test_without_strip_path_the_full_path_is_forwarded(gateway, acme, upstream, bob_app, key):
    api = publish(acme, upstream.url, base_path="/api/orders", strip_path=False)
    subscribe(bob_app, api)
    gateway.get("/api/orders/42", headers={"X-API-Key": key})
    assert upstream.paths == ["/api/orders/42"]


def test_draft_and_retired_apis_answer_404_like_unknown_paths(gateway, acme, upstream, key):
    publish(acme, upstream.url, base_path="/api/draft", status="draft")
    assert gateway.get("/api/draft/x", headers={"X-API-Key": key}).status == 404
    assert gateway.get("/api/nothing-here", headers={"X-API-Key": key}).status == 404
    assert upstream.seen == []


def test_deprecated_api_routes_with_deprecation_and_sunset_headers(gateway, users_api, upstream, key):
    import datetime

    sunset = datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    services.api_deprecate(api=users_api, actor=None, sunset_at=sunset)
    response = gateway.get("/api/users/v1/x", headers={"X-API-Key": key})
    assert response.status == 200
    assert response.header("Deprecation") == "true"
    assert response.header("Sunset") == "Thu, 02 Jan 2031 03:04:05 GMT"


def test_control_plane_paths_fall_through_to_django(gateway, users_api):
    assert gateway.get("/health").status == 200
    assert gateway.get("/health").json() == {"status": "ok"}


def test_under_gunicorn_path_parameter_dots_and_double_encoding_are_refused(live_env, acme, bob_app, bob_key, tmp_path):
    """The same refusals through the production worker (its lean path builds RAW_URI itself)."""
    import http.client
    from urllib.parse import urlsplit

    from tests.gateway.upstreams import recording_upstream
    from tests.support.servers import gunicorn

    with recording_upstream() as upstream:
        subscribe(bob_app, publish(acme, upstream.url + "/svc", key_query_param="apikey"))
        env = {**live_env, "USAGE_SPOOL_DIR": str(tmp_path / "spool"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p")}
        with gunicorn(env, workers=1, log_path=tmp_path / "gunicorn.log") as url:
            parts = urlsplit(url)

            def get(target: str, headers: dict[str, str]) -> int:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                conn.request("GET", target, headers=headers)  # sent as written: no client-side normalisation
                status = conn.getresponse().status
                conn.close()
                return status

            header = {"X-API-Key": bob_key[1]}
            assert get("/api/users/v1/..;/..;/admin", header) == 400
            assert get("/api/users/v1/%252e%252e/admin", header) == 400
            assert get("/api/users/v1/x%252fy", header) == 400
            assert get(f"/api/users/v1/a?x=1;apikey={bob_key[1]}", {}) == 200
    assert upstream.paths == ["/svc/a?x=1"]
