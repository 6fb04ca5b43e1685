"""Request-target checks and the per-worker route table (longest base_path on segment boundaries, host first)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from apimgmt.selectors import PolicySpec, RouteSnapshot, RouteSpec
from apimgmt.spec_operations import OperationTable
from gateway.chain import EMPTY, Chain, build_chain, plan_policies_by_type

# Escapes of unreserved characters that are safe to decode before matching (RFC 3986 §6.2.2.2);
# "." is unreserved too but is refused instead, so "%2e%2e" can never become a dot segment.
_UNRESERVED_ESCAPE = re.compile(r"%(4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[Dd]|5[Ff]|7[Ee])")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_LITERAL = re.compile(r"[\x00-\x20\x7f\\#]")
_FORBIDDEN_ESCAPES = frozenset({"2e", "2f", "5c", "00", "7f"})
# "%25" followed (after any number of further "25"s) by an escaped dot, slash, backslash or NUL: one more decoding
# by an upstream (or a proxy between) turns it into exactly what _FORBIDDEN_ESCAPES refuses.
_MULTI_ENCODED = re.compile(r"%25(?:25)*(?:2e|2f|5c|00)", re.IGNORECASE)
# A segment's path parameters start at ";" (RFC 3986 §3.3; Tomcat, Jetty and Spring strip them before resolving
# dot segments, so "..;x" is ".." to them). "%3B" counts too: some servers decode it first.
_PATH_PARAMS = re.compile(r";|%3[Bb]")


class BadRequestTarget(ValueError):
    """The request target is not a normalised path; the message says why (shown to the client)."""


@dataclass(frozen=True)
class Target:
    """One upstream of an API: where to connect and the path prefix to put in front."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: str  # upstream path without a trailing slash ("" for the root)
    weight: int


@dataclass
class Route:
    """A routable API as the gateway uses it (built once per route-table load)."""

    spec: RouteSpec
    targets: list[Target]
    policies: list[PolicySpec]
    key_header_environ: str
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    # restrict_to_spec: the operations the API's OpenAPI document allows (None: every path and method).
    operations: OperationTable | None = None
    # The policy steps this API's policies ask for (gateway.chain); EMPTY when none.
    chain: Chain = EMPTY
    auth_method: str = "key"  # key | jwt | key_or_jwt

    @property
    def api_id(self) -> str:
        return self.spec.api_id

    @property
    def tenant_id(self) -> str:
        return self.spec.tenant_id


def split_request_target(raw_uri: str) -> tuple[str, str]:
    """Validate a raw request target and return (normalised path, raw query).

    The path keeps its percent-encoding except for escapes of unreserved characters, which are
    decoded so that ``/api/%75sers`` matches ``/api/users``. Dot segments (literal or encoded, also with path
    parameters: ``..;x``), encoded or double-encoded dots, slashes or backslashes, control characters, empty
    segments and invalid UTF-8 are refused.
    """
    if not raw_uri.startswith("/"):
        if "://" not in raw_uri:
            raise BadRequestTarget("The request target must be an absolute path.")
        # absolute-form (RFC 9112 §3.2.2): keep only the path and query.
        rest = raw_uri.split("://", 1)[1]
        slash = rest.find("/")
        raw_uri = rest[slash:] if slash >= 0 else "/"
    path, _, query = raw_uri.partition("?")
    if _BAD_LITERAL.search(path):
        raise BadRequestTarget("The path contains a control character, space, backslash or '#'.")
    if "%" in path:
        for match in _ESCAPE.finditer(path):
            if match.group(1).lower() in _FORBIDDEN_ESCAPES or int(match.group(1), 16) < 0x20:
                raise BadRequestTarget("The path contains an encoded '.', '/', '\\' or control character.")
        if path.count("%") != len(_ESCAPE.findall(path)):
            raise BadRequestTarget("The path contains a '%' that does not start a valid escape.")
        if _MULTI_ENCODED.search(path):
            raise BadRequestTarget("The path contains a double-encoded '.', '/', '\\' or NUL (such as '%252e').")
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
        raw_bytes = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path).encode("latin-1")
    else:
        raw_bytes = path.encode("latin-1")
    if not raw_bytes.isascii():
        try:
            raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequestTarget("The path is not valid UTF-8.") from exc
        if not path.isascii():
            # Literal non-ASCII bytes (gunicorn hands them over as latin-1): percent-encode them for the upstream.
            path = "".join(ch if ord(ch) < 128 else f"%{ord(ch):02X}" for ch in path)
    if "/." in path or "//" in path:
        for segment in path.split("/")[1:-1]:
            if segment == "":
                raise BadRequestTarget("The path contains an empty segment ('//').")
        for segment in path.split("/")[1:]:
            if _PATH_PARAMS.split(segment, 1)[0] in (".", ".."):
                raise BadRequestTarget(
                    "The path contains a '.' or '..' segment (path parameters such as ';x' included)."
                )
    return path, query


def _target(url: str, weight: int) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    return Target(
        url=url,
        scheme=scheme,
        host=parts.hostname or "",
        port=port,
        prefix=parts.path.rstrip("/"),
        weight=max(1, int(weight)),
    )


def build_route(spec: RouteSpec, plan_policies: dict[str, list[PolicySpec]]) -> Route:
    extra: list[tuple[str, str]] = []
    if spec.status == "deprecated":
        extra.append(("Deprecation", "true"))
        if spec.sunset_at:
            from datetime import datetime
            from email.utils import format_datetime

            extra.append(("Sunset", format_datetime(datetime.fromisoformat(spec.sunset_at), usegmt=True)))
    return Route(
        spec=spec,
        targets=[_target(url, weight) for url, weight in spec.targets],
        policies=list(spec.policies),
        key_header_environ="HTTP_" + spec.key_header.upper().replace("-", "_"),
        extra_headers=extra,
        operations=OperationTable({"paths": spec.spec_paths}) if spec.spec_paths is not None else None,
        auth_method=spec.auth_method,
    )


class RouteTable:
    """Routes by host ("" = any host) and base_path; lookups walk the path's prefixes, longest first."""

    def __init__(self, snapshot: RouteSnapshot) -> None:
        self.plan_policies = snapshot.plan_policies
        self.by_host: dict[str, dict[str, Route]] = {}
        plans_by_type = plan_policies_by_type(snapshot.plan_policies, snapshot.plan_tenants)
        for spec in snapshot.routes:
            route = build_route(spec, snapshot.plan_policies)
            route.chain = build_chain(route, plans_by_type)
            self.by_host.setdefault(spec.host.lower(), {})[spec.base_path] = route
        self.routes = [route for table in self.by_host.values() for route in table.values()]

    def resolve(self, host: str, path: str) -> Route | None:
        """The route for ``path`` on ``host``: an API bound to the host wins over one without."""
        if host and self.by_host.get(host):
            route = self._longest(self.by_host[host], path)
            if route is not None:
                return route
        generic = self.by_host.get("")
        return self._longest(generic, path) if generic else None

    @staticmethod
    def _longest(table: dict[str, Route], path: str) -> Route | None:
        candidate = path.rstrip("/") if len(path) > 1 else path
        while candidate:
            route = table.get(candidate)
            if route is not None:
                return route
            cut = candidate.rfind("/")
            if cut <= 0:
                return None
            candidate = candidate[:cut]
        return None
