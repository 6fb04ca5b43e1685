"""The one helper that builds every error the gateway itself answers with (application/problem+json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus

PROBLEM_TYPE_BASE = "urn:apimgmt:problem:"


@dataclass
class GatewayResponse:
    """A response the gateway produced without the upstream: status, headers and a small body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    request_id: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    extra: dict[str, object] | None = None,
) -> GatewayResponse:
    """An RFC 9457 problem document: ``type``, ``title``, ``status``, ``detail``, ``request_id`` (+ ``extra``)."""
    document: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    if extra:
        document.update(extra)
    body = json.dumps(document).encode()
    all_headers = [
        ("Content-Type", "application/problem+json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    all_headers += headers or []
    return GatewayResponse(status=status, headers=all_headers, body=body)
