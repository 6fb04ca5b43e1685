"""The in-process fallback: gateway.middleware.GatewayMiddleware answering API paths inside Django's own stack."""

from __future__ import annotations

import pytest
from django.test import Client

from gateway.wsgi import reset_gateway
from tests.gateway.upstreams import Answer


@pytest.fixture
def client():
    # Django's test client runs the MIDDLEWARE stack (no apimgmt.wsgi wrapper): GatewayMiddleware is first.
    reset_gateway()
    yield Client()
    reset_gateway()


def test_api_request_through_django_middleware_reaches_the_upstream(client, users_api, upstream, key):
    upstream.respond = lambda seen: Answer(
        status=201,
        headers=[("Content-Type", "application/json"), ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")],
        body=b'{"created": true}',
    )
    response = client.post(
        "/api/users/v1/items?x=1", data=b'{"n": 1}', content_type="application/json", HTTP_X_API_KEY=key
    )
    assert response.status_code == 201
    assert b"".join(response.streaming_content) == b'{"created": true}'
    (seen,) = upstream.seen
    assert seen.method == "POST" and seen.path == "/svc/items?x=1" and seen.body == b'{"n": 1}'
    assert "x-api-key" not in seen.headers
    assert seen.headers["x-request-id"] == response["X-Request-ID"]
    assert {c.key: c.value for c in response.cookies.values()} == {"a": "1", "b": "2"}


def test_refusals_from_the_middleware_are_problem_documents(client, users_api, upstream):
    response = client.get("/api/users/v1/items")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert upstream.seen == []


def test_paths_outside_every_api_fall_through_to_django(client, users_api, upstream):
    assert client.get("/health").status_code == 200
    assert client.get("/api/users/v2/items").status_code == 404  # not an API: Django's own 404
    assert upstream.seen == []
