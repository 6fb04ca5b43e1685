"""Django's last-resort error views: under /mgmt/ they answer application/problem+json like the rest of the API.

DRF's exception handler (apimgmt.api.exceptions) shapes every error a view raises on purpose. Two kinds never reach it:
a request body over DATA_UPLOAD_MAX_MEMORY_SIZE (Django raises while the body is read: 413 here, not an HTML 400) and
an unexpected exception (an HTML 500 page, useless to a script). Elsewhere (admin, portal) Django's own pages stay.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.views import defaults

from apimgmt.context import request_id_var

PROBLEM_CONTENT_TYPE = "application/problem+json"


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/mgmt/")


def _problem(status: int, detail: str) -> HttpResponse:
    body: dict[str, object] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    request_id = request_id_var.get()
    if request_id:
        body["request_id"] = request_id
    return HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)


def bad_request(request: HttpRequest, exception: Exception, template_name: str = "400.html") -> HttpResponse:
    if not _is_api(request):
        return defaults.bad_request(request, exception, template_name)
    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return _problem(413, f"The request body is larger than the management API accepts ({limit} bytes).")
    return _problem(400, "The request could not be read; check its headers and body.")


def server_error(request: HttpRequest, template_name: str = "500.html") -> HttpResponse:
    if not _is_api(request):
        return defaults.server_error(request, template_name)
    return _problem(500, "An unexpected error stopped this request. Quote the request_id when reporting it.")
