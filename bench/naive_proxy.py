"""The baseline of `make bench`: a plain Django view forwarding every request with a requests.Session.

Run: gunicorn bench.naive_proxy:application (NAIVE_UPSTREAM=http://host:port). Django's full request path
(URL resolution, the default middleware) and requests' per-call overhead, nothing else.
"""

from __future__ import annotations

import os
import threading

import django
import requests
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse
from django.urls import re_path

UPSTREAM = os.environ.get("NAIVE_UPSTREAM", "http://127.0.0.1:8080")
_local = threading.local()


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False
        _local.session = session
    return session


def forward(request: HttpRequest, path: str) -> HttpResponse:
    upstream = _session().get(UPSTREAM + "/" + path, params=request.GET, timeout=10, allow_redirects=False)
    return HttpResponse(
        upstream.content, status=upstream.status_code, content_type=upstream.headers.get("Content-Type")
    )


urlpatterns = [re_path(r"^(?P<path>.*)$", forward)]

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only-not-secret",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
        ],
        INSTALLED_APPS=[],
    )
    django.setup()

application = get_wsgi_application()
