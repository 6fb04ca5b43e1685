"""Checks the policy types share: known fields, integers, booleans, lists of names, CIDRs and header names."""

from __future__ import annotations

import difflib
import ipaddress
import re
from typing import Any

from django.core.exceptions import ValidationError

# An HTTP field name is a token (RFC 9110, 5.6.2); 64 characters are plenty for a real one.
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,64}\Z")
METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}\Z")
MAX_LIST = 100
MAX_CIDRS = 1000


def unknown_fields(config: dict[str, Any], allowed: set[str]) -> str:
    """The unknown field names, each with the closest allowed one when there is a likely typo (empty: none)."""
    named = []
    for name in sorted(str(key) for key in set(config) - allowed):
        close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
        named.append(f"{name} (did you mean `{close[0]}`?)" if close else name)
    return ", ".join(named)


def check_known(config: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """``config`` as an object with only ``allowed`` fields; ``where`` names it (the type, or a nested path)."""
    if not isinstance(config, dict):
        raise ValidationError(f"{where} must be a JSON object.")
    unknown = unknown_fields(config, allowed)
    if unknown:
        raise ValidationError(f"unknown field(s) in {where}: {unknown}; allowed: {', '.join(sorted(allowed))}.")
    return config


def integer(config: dict[str, Any], name: str, *, default: int | None, low: int, high: int) -> int | None:
    value = config.get(name, default)
    if value is None and default is None and name not in config:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{name} must be an integer from {low} to {high}.")
    return value


def boolean(config: dict[str, Any], name: str, *, default: bool) -> bool:
    value = config.get(name, default)
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false.")
    return value


def string_list(config: dict[str, Any], name: str, *, default: list[str], max_items: int = MAX_LIST) -> list[str]:
    value = config.get(name, default)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(f"{name} must be a list of strings.")
    if len(value) > max_items:
        raise ValidationError(f"{name} takes at most {max_items} entries.")
    return list(value)


def header_names(config: dict[str, Any], name: str, *, default: list[str], allow_star: bool = False) -> list[str]:
    """Header names, each once (case-insensitive), in the spelling given."""
    result: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(string_list(config, name, default=default)):
        if item == "*" and allow_star:
            pass
        elif not HEADER_NAME.match(item):
            raise ValidationError(f"{name}[{index}]: {item!r} is not an HTTP header name (letters, digits, '-').")
        if item.lower() not in seen:
            seen.add(item.lower())
            result.append(item)
    return result


def methods(config: dict[str, Any], name: str, *, default: list[str]) -> list[str]:
    """HTTP methods, upper-cased, each once."""
    result: list[str] = []
    for index, item in enumerate(string_list(config, name, default=default)):
        method = item.upper()
        if not METHOD.match(method):
            raise ValidationError(f"{name}[{index}]: {item!r} is not an HTTP method such as GET or POST.")
        if method not in result:
            result.append(method)
    return result


def cidr(value: Any, where: str) -> str:
    """One network (``10.0.0.0/8``, ``2001:db8::/32``) or address (a /32 or /128), in its canonical form.

    A network with host bits set (``10.0.0.1/8``) is refused, naming the network it would be: a typo there would
    otherwise silently allow or deny far more (or other) addresses than meant.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{where} must be a CIDR such as 203.0.113.0/24 or 2001:db8::/32.")
    text = value.strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValidationError(
                f"{where}: {value!r} is not an IPv4 or IPv6 address or network (e.g. 203.0.113.0/24)."
            ) from exc
        raise ValidationError(
            f"{where}: {value!r} has host bits set; the network is {loose}. Write {loose}, or the single "
            f"address {text.split('/')[0]}."
        ) from exc
    return str(network)


def cidr_list(value: Any, where: str) -> list[str]:
    """A list of CIDRs (see ``cidr``), each once, in canonical form."""
    if not isinstance(value, list):
        raise ValidationError(f'{where} must be a list of CIDRs such as ["203.0.113.0/24"].')
    if len(value) > MAX_CIDRS:
        raise ValidationError(f"{where} takes at most {MAX_CIDRS} entries.")
    result: list[str] = []
    for index, item in enumerate(value):
        network = cidr(item, f"{where}[{index}]")
        if network not in result:
            result.append(network)
    return result
