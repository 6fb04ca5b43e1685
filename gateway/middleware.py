"""The gateway pipeline as Django middleware, for servers that do not run apimgmt.wsgi (runserver, test client)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse

from gateway.wsgi import CHECKED, get_gateway


class GatewayMiddleware:
    """First in MIDDLEWARE: a request under an API's base_path is answered here; any other passes through.

    Under gunicorn the same pipeline already ran as WSGI middleware (apimgmt.wsgi), so API requests never get here.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        result = None if request.META.get(CHECKED) else get_gateway().handle(request.META)
        if result is None:
            return self.get_response(request)
        status = int(result.status.split(" ", 1)[0])
        response = StreamingHttpResponse(result.body, status=status, reason=result.status[4:] or None)
        # Django's default Content-Type is not the answer's: the upstream's (or the problem document's) replaces it,
        # and an answer without one stays without one.
        del response.headers["Content-Type"]
        seen: set[str] = set()
        for name, value in result.headers:
            lower = name.lower()
            if lower == "set-cookie":
                response.cookies.load(value)
            elif lower in seen:
                response.headers[name] = f"{response.headers[name]}, {value}"
            else:
                response.headers[name] = value
                seen.add(lower)
        return response
