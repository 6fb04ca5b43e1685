"""Validation shared by the admin, the management API and the portal: base paths, upstream URLs, policy configs."""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import zoneinfo
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

from apimgmt import limits

# Control-plane prefixes an API may not claim (their first path segment).
RESERVED_SEGMENTS = frozenset({"admin", "mgmt", "portal", "static", "health", "ready", "metrics"})
# Unreserved and sub-delim characters of RFC 3986, plus ":" and "@"; no "%" (no encoded bytes in a base path).
_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@]+$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,64}$")
_QUERY_PARAM = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def validate_base_path(value: str) -> str:
    """A normalised absolute path: '/a/b', no dot segments, no empty segments, no trailing slash, not reserved."""
    if not value.startswith("/"):
        raise ValidationError("base_path must start with '/' (for example /api/users/v1).", code="invalid")
    if value == "/":
        raise ValidationError("base_path '/' would capture the whole site; use a prefix such as /api.", code="invalid")
    if value.endswith("/"):
        raise ValidationError("base_path must not end with '/'.", code="invalid")
    if len(value) > 200:
        raise ValidationError("base_path must be at most 200 characters.", code="max_length")
    segments = value[1:].split("/")
    for segment in segments:
        if segment == "":
            raise ValidationError("base_path must not contain empty segments ('//').", code="invalid")
        if segment in (".", ".."):
            raise ValidationError("base_path must not contain '.' or '..' segments.", code="invalid")
        if not _SEGMENT.match(segment):
            raise ValidationError(
                f"base_path segment {segment!r} has characters that are not allowed; "
                "use letters, digits and - . _ ~ (no '%', spaces, '?', '#' or '\\').",
                code="invalid",
            )
    if segments[0].lower() in RESERVED_SEGMENTS:
        reserved = ", ".join(f"/{s}" for s in sorted(RESERVED_SEGMENTS))
        raise ValidationError(f"base_path may not start with a reserved prefix ({reserved}).", code="reserved")
    return value


def validate_host(value: str) -> str:
    """An optional Host to route on: a DNS name, lowercase, without port."""
    if value == "":
        return value
    if not _HOSTNAME.match(value):
        raise ValidationError("host must be a DNS name such as api.example.com (no scheme, port or path).")
    return value.lower()


# IPv6 forms that carry an IPv4 address in their last 32 bits (what is reached is that IPv4 address): NAT64's
# well-known prefix (RFC 6052), IPv4-translated (RFC 2765) and the deprecated IPv4-compatible form (RFC 4291).
_EMBEDS_IPV4_AT_END = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64, IPv4-translated or -compatible)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if any(addr in network for network in _EMBEDS_IPV4_AT_END):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_forbidden_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for any address that is not globally routable (loopback, private, CGNAT, link-local incl.
    cloud metadata, multicast, reserved), also when an IPv6 address embeds such an IPv4 address
    (``[::ffff:127.0.0.1]``, ``[64:ff9b::7f00:1]``, ``[2002:7f00:1::]``, ``[::7f00:1]``, ``[::ffff:0:7f00:1]``)."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            addr = inner
        elif addr.is_reserved:  # the rest of ::/8 (NAT64's local-use 64:ff9b:1::/48 too) and other IETF-reserved
            return True
    return not addr.is_global or addr.is_multicast


def validate_upstream_url(value: str, *, allow_private: bool | None = None) -> str:
    """An http(s) URL without credentials, query or fragment; private targets only when allowed."""
    allow = settings.UPSTREAM_ALLOW_PRIVATE if allow_private is None else allow_private
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"upstream_url is not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError("upstream_url must start with http:// or https://.")
    if not parts.hostname:
        raise ValidationError("upstream_url must name a host, e.g. http://users.internal:8000.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValidationError("upstream_url must not contain a user name or password.")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValidationError("upstream_url must not contain a query string or fragment.")
    if port is not None and not 0 < port < 65536:
        raise ValidationError("upstream_url has an invalid port.")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValidationError("upstream_url path must not contain '.' or '..' segments.")
    if any(ch in value for ch in " \t\r\n\\") or "%2f" in value.lower() or "%2e" in value.lower():
        raise ValidationError("upstream_url must not contain whitespace, backslashes or encoded '/' or '.'.")
    if allow:
        return value
    host = parts.hostname.lower().rstrip(".")
    private_message = (
        f"upstream_url host {host!r} is a loopback, private, link-local or metadata address; "
        "set UPSTREAM_ALLOW_PRIVATE=true to allow internal upstreams."
    )
    if host == "localhost" or host.endswith((".localhost", ".internal")) or host in _METADATA_HOSTS:
        raise ValidationError(private_message)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        if is_forbidden_address(literal):
            raise ValidationError(private_message)
        return value
    # A name may still point inside (or be a numeric form like 2130706433): check what it resolves to.
    try:
        infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return value  # Unresolvable now; the gateway checks the addresses it resolves before connecting.
    for info in infos:
        if is_forbidden_address(ipaddress.ip_address(info[4][0])):
            raise ValidationError(private_message)
    return value


def validate_header_name(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValidationError("key_header must be a valid HTTP header name such as X-API-Key.")
    if value.lower() in ("host", "content-length", "transfer-encoding", "connection", "cookie"):
        raise ValidationError(f"key_header cannot be {value!r}.")
    return value


def validate_query_param(value: str) -> str:
    if value and not _QUERY_PARAM.match(value):
        raise ValidationError("key_query_param may use letters, digits, '_', '-' and '.' (up to 64).")
    return value


def validate_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"{value!r} is not a known IANA time zone (e.g. Europe/Berlin).") from exc
    return value


# ---------------------------------------------------------------------------
# Policy configs
# ---------------------------------------------------------------------------

# The window fields and counter scopes are the rate-limit contract's (apimgmt.limits), written there once.
KEY_EXTRACTIONS = limits.SCOPES
RATE_WINDOWS = {name: seconds for name, (_label, seconds) in limits.RATE_WINDOWS.items()}
QUOTA_WINDOWS = tuple(limits.QUOTA_WINDOWS)
_MAX_LIMIT = 10**12


def _positive_int(config: dict[str, Any], name: str, *, allow_zero: bool = False) -> int:
    value = config[name]
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_LIMIT:
        kind = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValidationError(f"{name} must be {kind}.")
    return value


def _unknown_fields(config: dict[str, Any], allowed: set[str]) -> str:
    """The config's unknown field names, each with the closest allowed one when there is a likely typo:
    "requests_per_minut (did you mean `requests_per_minute`?)"; empty when every field is known."""
    named = []
    for name in sorted(str(key) for key in set(config) - allowed):
        close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
        named.append(f"{name} (did you mean `{close[0]}`?)" if close else name)
    return ", ".join(named)


def validate_policy_config(policy_type: str, config: Any) -> dict[str, Any]:
    """Validate and normalise a policy's config; the error names the offending field (and the closest valid one
    for a field it does not know: the admin, the management API and config documents all come through here)."""
    if not isinstance(config, dict):
        raise ValidationError("config must be a JSON object.")
    if policy_type == "rate_limiting":
        allowed = set(RATE_WINDOWS) | {"burst_size", "key_extraction", "window_type"}
        windows = [w for w in RATE_WINDOWS if w in config]
        needed = "rate_limiting config needs at least one of " + ", ".join(RATE_WINDOWS)
    elif policy_type == "quota":
        allowed = set(QUOTA_WINDOWS) | {"key_extraction"}
        windows = [w for w in QUOTA_WINDOWS if w in config]
        needed = "quota config needs requests_per_day and/or requests_per_month"
    else:
        raise ValidationError(f"policy_type must be rate_limiting or quota (got {policy_type!r}).")
    unknown = _unknown_fields(config, allowed)
    if not windows:
        raise ValidationError(f"{needed}" + (f"; unknown config field(s): {unknown}." if unknown else "."))
    if unknown:
        raise ValidationError(
            f"unknown config field(s) for {policy_type}: {unknown}; allowed: {', '.join(sorted(allowed))}."
        )
    normalised: dict[str, Any] = {w: _positive_int(config, w) for w in windows}
    extraction = config.get("key_extraction", "consumer_id")
    if extraction not in KEY_EXTRACTIONS:
        raise ValidationError(f"key_extraction must be one of {', '.join(KEY_EXTRACTIONS)}.")
    normalised["key_extraction"] = extraction
    if policy_type == "rate_limiting":
        window_type = config.get("window_type", "sliding")
        if window_type not in ("sliding", "fixed"):
            raise ValidationError("window_type must be 'sliding' or 'fixed'.")
        normalised["window_type"] = window_type
        burst = _positive_int(config, "burst_size", allow_zero=True) if "burst_size" in config else 0
        if burst and window_type == "fixed":
            raise ValidationError("burst_size only applies to window_type 'sliding'.")
        normalised["burst_size"] = burst
    return normalised
