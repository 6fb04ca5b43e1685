"""Validation shared by the admin, the management API and the portal: base paths, upstream URLs, policy configs."""

from __future__ import annotations

import ipaddress
import re
import socket
import zoneinfo
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

from apimgmt import limits
from apimgmt.policy_types import VALIDATORS as POLICY_TYPE_VALIDATORS
from apimgmt.policy_types import fields as policy_fields

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


def validate_upstream_url(value: str, *, allow_private: bool | None = None, field: str = "upstream_url") -> str:
    """An http(s) URL without credentials, query or fragment; private targets only when allowed.

    ``field`` names the setting in messages: a JWT issuer's jwks_url goes through the same checks.
    """
    allow = settings.UPSTREAM_ALLOW_PRIVATE if allow_private is None else allow_private
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"{field} is not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"{field} must start with http:// or https://.")
    if not parts.hostname:
        raise ValidationError(f"{field} must name a host, e.g. http://users.internal:8000.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValidationError(f"{field} must not contain a user name or password.")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValidationError(f"{field} must not contain a query string or fragment.")
    if port is not None and not 0 < port < 65536:
        raise ValidationError(f"{field} has an invalid port.")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValidationError(f"{field} path must not contain '.' or '..' segments.")
    if any(ch in value for ch in " \t\r\n\\") or "%2f" in value.lower() or "%2e" in value.lower():
        raise ValidationError(f"{field} must not contain whitespace, backslashes or encoded '/' or '.'.")
    if allow:
        return value
    host = parts.hostname.lower().rstrip(".")
    private_message = (
        f"{field} host {host!r} is a loopback, private, link-local or metadata address; "
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


# One spelling of "unknown field, did you mean …" for every policy type (apimgmt/policy_types/fields.py).
_unknown_fields = policy_fields.unknown_fields


def validate_policy_config(policy_type: str, config: Any) -> dict[str, Any]:
    """Validate and normalise a policy's config; the error names the offending field (and the closest valid one
    for a field it does not know: the admin, the management API and config documents all come through here)."""
    if not isinstance(config, dict):
        raise ValidationError("config must be a JSON object.")
    typed = POLICY_TYPE_VALIDATORS.get(policy_type)
    if typed is not None:
        return typed(config)
    if policy_type == "rate_limiting":
        allowed = set(RATE_WINDOWS) | {"burst_size", "key_extraction", "window_type"}
        windows = [w for w in RATE_WINDOWS if w in config]
        needed = "rate_limiting config needs at least one of " + ", ".join(RATE_WINDOWS)
    elif policy_type == "quota":
        allowed = set(QUOTA_WINDOWS) | {"key_extraction"}
        windows = [w for w in QUOTA_WINDOWS if w in config]
        needed = "quota config needs requests_per_day and/or requests_per_month"
    else:
        known = ", ".join(["rate_limiting", "quota", *POLICY_TYPE_VALIDATORS])
        raise ValidationError(f"policy_type must be one of {known} (got {policy_type!r}).")
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


# ---------------------------------------------------------------------------
# IP lists of consumers and keys
# ---------------------------------------------------------------------------


def validate_cidr_list(value: Any, field: str) -> list[str]:
    """A consumer's or key's ``ip_allow``/``ip_deny``: CIDRs in canonical form; host bits set are refused."""
    return policy_fields.cidr_list(value, field)


# ---------------------------------------------------------------------------
# JWT issuers
# ---------------------------------------------------------------------------

# Asymmetric signatures only: "none" and the HMAC family (HS*) would let anyone who knows the public key sign.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_ALGORITHM_KEY_TYPES = {"R": "RSA", "P": "RSA", "E": "EC", "Ed": "OKP"}
MAX_LEEWAY_SECONDS = 300
MAX_AUDIENCES = 20
MAX_JWKS_KEYS = 20
_CLAIM_NAME = re.compile(r"^[A-Za-z0-9_:.\-]{1,100}\Z")
# Members that only a private key has: inline keys are published keys, never signing material.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}


def validate_issuer(value: Any) -> str:
    """The ``iss`` a token must carry: an http(s) URL such as https://id.example.com/ (compared exactly)."""
    if not isinstance(value, str) or not value:
        raise ValidationError("issuer must be the identity provider's issuer URL, e.g. https://id.example.com/.")
    if len(value) > 2000:
        raise ValidationError("issuer must be at most 2000 characters.")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        raise ValidationError("issuer must not contain spaces or control characters.")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValidationError(f"issuer is not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("issuer must be an http(s) URL naming a host, e.g. https://id.example.com/.")
    if parts.query or parts.fragment:
        raise ValidationError("issuer must not contain a query string or fragment.")
    return value


def validate_audiences(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("audiences must be a list of strings (the aud values tokens for this API carry).")
    cleaned = [item.strip() for item in value]
    if not cleaned or not all(cleaned):
        raise ValidationError(
            "audiences needs at least one non-empty value: without one, a token the issuer made for any other "
            "service would be accepted."
        )
    if len(cleaned) > MAX_AUDIENCES or any(len(item) > 500 for item in cleaned):
        raise ValidationError(f"audiences takes at most {MAX_AUDIENCES} values of up to 500 characters.")
    return list(dict.fromkeys(cleaned))


def validate_algorithms(value: Any) -> list[str]:
    allowed = ", ".join(JWT_ALGORITHMS)
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"algorithms must be a non-empty list from {allowed}.")
    for item in value:
        if item.lower() == "none" or item.upper().startswith("HS"):
            raise ValidationError(
                f"algorithms cannot include {item!r}: only public-key signatures are accepted ({allowed})."
            )
        if item not in JWT_ALGORITHMS:
            raise ValidationError(f"algorithms: {item!r} is not one of {allowed}.")
    return list(dict.fromkeys(value))


def validate_leeway(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LEEWAY_SECONDS:
        raise ValidationError(f"leeway_seconds must be an integer from 0 to {MAX_LEEWAY_SECONDS}.")
    return value


def validate_claim_name(value: Any) -> str:
    if not isinstance(value, str) or not _CLAIM_NAME.match(value):
        raise ValidationError("consumer_claim must be a claim name such as sub, azp or client_id.")
    return value


def validate_token_query_param(value: Any) -> str:
    if not isinstance(value, str) or (value and not _QUERY_PARAM.match(value)):
        raise ValidationError("token_in_query may use letters, digits, '_', '-' and '.' (up to 64); empty: never.")
    return value


def _parse_jwk(key: dict[str, Any], where: str) -> None:
    """The key as PyJWT reads it, the way the gateway will verify with it: a key it cannot build is refused now,
    not at the first token."""
    import jwt  # here, not at import time: only issuer checks need it (and it loads cryptography)

    try:
        jwt.PyJWK(key)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:  # PyJWT's own, and bad numbers or encodings underneath
        raise ValidationError(f"{where} is not a usable public key: {str(exc).rstrip('.')}.") from exc


def validate_public_keys(value: Any) -> dict[str, Any] | None:
    """Inline keys as a JWKS document ``{"keys": [...]}``: public RSA, EC or OKP keys, a distinct kid each when
    there is more than one. None (or {}) means "no inline keys"."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise ValidationError('public_keys must be a JWKS document: {"keys": [{"kty": "RSA", "kid": …, "n": …}]}.')
    unknown = _unknown_fields(value, {"keys"})
    if unknown:
        raise ValidationError(f"public_keys: unknown field(s) {unknown}; a JWKS document has only keys.")
    keys = value["keys"]
    if not keys or len(keys) > MAX_JWKS_KEYS:
        raise ValidationError(f"public_keys needs from 1 to {MAX_JWKS_KEYS} keys.")
    kids: set[str] = set()
    for index, key in enumerate(keys):
        where = f"public_keys.keys[{index}]"
        if not isinstance(key, dict):
            raise ValidationError(f"{where} must be a JSON object (a JWK).")
        kty = key.get("kty")
        if kty == "oct":
            raise ValidationError(f"{where}: a symmetric key (kty oct) is a shared secret; use public keys only.")
        if kty not in _PUBLIC_MEMBERS:
            raise ValidationError(f"{where}.kty must be RSA, EC or OKP.")
        private = [member for member in _PRIVATE_MEMBERS if member in key]
        if private:
            raise ValidationError(
                f"{where} holds private key material ({', '.join(private)}); publish the public key only."
            )
        missing = [member for member in _PUBLIC_MEMBERS[kty] if not isinstance(key.get(member), str)]
        if missing:
            raise ValidationError(f"{where} ({kty}) lacks {', '.join(missing)}.")
        kid = key.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValidationError(f"{where}.kid must be a non-empty string.")
        if kid is None and len(keys) > 1:
            raise ValidationError(f"{where}.kid is required when there is more than one key (tokens name it).")
        if kid in kids:
            raise ValidationError(f"{where}.kid {kid!r} is used by another key.")
        if kid is not None:
            kids.add(kid)
        _parse_jwk(key, where)
    return {"keys": keys}


def jwt_issuer_errors(
    *,
    issuer: Any,
    audiences: Any,
    jwks_url: Any,
    public_keys: Any,
    algorithms: Any,
    leeway_seconds: Any,
    consumer_claim: Any,
    token_in_query: Any,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every setting of a JWT issuer checked: (normalised values, {field: messages}). The admin and the services
    both call it, so a setting refused in one is refused in the other with the same words."""
    cleaned: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    checks: tuple[tuple[str, Any, Any], ...] = (
        ("issuer", issuer, validate_issuer),
        ("audiences", audiences, validate_audiences),
        ("public_keys", public_keys, validate_public_keys),
        ("algorithms", algorithms, validate_algorithms),
        ("leeway_seconds", leeway_seconds, validate_leeway),
        ("consumer_claim", consumer_claim, validate_claim_name),
        ("token_in_query", token_in_query, validate_token_query_param),
    )
    for name, value, check in checks:
        try:
            cleaned[name] = check(value)
        except ValidationError as exc:
            errors[name] = exc.messages
    if not isinstance(jwks_url, str):
        errors["jwks_url"] = ["jwks_url must be a string (empty: no URL)."]
    elif jwks_url:
        try:
            cleaned["jwks_url"] = validate_upstream_url(jwks_url, field="jwks_url")
        except ValidationError as exc:
            errors["jwks_url"] = exc.messages
    else:
        cleaned["jwks_url"] = ""
    if "jwks_url" in cleaned and "public_keys" in cleaned:
        if not cleaned["jwks_url"] and cleaned["public_keys"] is None:
            errors["jwks_url"] = ["Set jwks_url (where the issuer publishes its keys) or public_keys (inline keys)."]
        elif cleaned["jwks_url"] and cleaned["public_keys"] is not None:
            errors["public_keys"] = ["Set jwks_url or public_keys, not both: the keys come from one place."]
    if "public_keys" in cleaned and cleaned["public_keys"] and "algorithms" in cleaned:
        kinds = {key["kty"] for key in cleaned["public_keys"]["keys"]}
        usable = [a for a in cleaned["algorithms"] if _algorithm_key_type(a) in kinds]
        if not usable:
            errors["algorithms"] = [
                f"None of algorithms {', '.join(cleaned['algorithms'])} fits the keys in public_keys "
                f"({', '.join(sorted(kinds))})."
            ]
    return cleaned, errors


def _algorithm_key_type(algorithm: str) -> str:
    return _ALGORITHM_KEY_TYPES["Ed" if algorithm == "EdDSA" else algorithm[0]]
