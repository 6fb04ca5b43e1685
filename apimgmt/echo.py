"""A tiny WSGI echo upstream for the demo and tests: answers with the request it received, as JSON.

Run it with ``gunicorn apimgmt.echo:app --config python:apimgmt.echo_gunicorn`` (no Django needed; the
project's ``gunicorn.conf.py`` holds the gateway's hooks and is not for it).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

MAX_ECHO_BODY = 1024 * 1024


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = environ[key]
    return headers


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Echo method, path (raw when the server provides it), query, headers and body (up to 1 MiB)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    body = stream.read(min(length, MAX_ECHO_BODY)) if length else b""
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    payload = {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("RAW_URI", environ.get("PATH_INFO", "")).split("?", 1)[0],
        "query": environ.get("QUERY_STRING", ""),
        "headers": _headers(environ),
        "body": text if text is not None else None,
        "body_base64": None if text is not None else base64.b64encode(body).decode(),
        "body_length": length,
    }
    data = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
