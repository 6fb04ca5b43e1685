"""The client's address behind trusted proxies: one rule for the gateway, the control plane and the management API.

``TRUSTED_PROXIES`` (settings.GATEWAY) lists the proxies whose ``X-Forwarded-For`` is believed. A request from any
other peer is that peer's. From a trusted peer, the hops are walked from the nearest outwards and the first one
that is not a trusted proxy is the client; when every hop is trusted, the farthest one is. What comes back is
always an IP address in canonical form (or the peer as the server gave it, "" for a Unix socket): a hop that is
not an address (``unknown``, ``1.2.3.4:80``, garbage from a misconfigured proxy) stops the walk at the last
trusted address, so per-address limits and audit rows never get a made-up value. A dual-stack listener hands an IPv4
peer over as an IPv4-mapped IPv6 address (``::ffff:10.0.0.5``): it is trusted as the IPv4 address it maps.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of ``TRUSTED_PROXIES`` entries (IPs or CIDRs; blanks ignored)."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip())


def configured_networks() -> tuple[Network, ...]:
    """The trusted proxies of the current settings."""
    return trusted_networks(tuple(settings.GATEWAY.get("TRUSTED_PROXIES", ())))


def _in_any(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable[Network]) -> bool:
    """Whether ``ip`` is in one of ``networks``; an IPv4-mapped IPv6 address (``::ffff:10.0.0.5``, how a dual-stack
    listener hands over an IPv4 peer) is also looked up as the IPv4 address it maps."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in network or (mapped is not None and mapped in network) for network in networks)


def is_trusted(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return _in_any(ip, networks)


def client_address(remote_addr: str, forwarded_for: str, networks: tuple[Network, ...]) -> str:
    """The client of a request that ``remote_addr`` sent us with ``forwarded_for`` (the X-Forwarded-For value)."""
    if not networks or not forwarded_for or not is_trusted(remote_addr, networks):
        return remote_addr
    nearest_trusted = remote_addr
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return nearest_trusted
        if not _in_any(ip, networks):
            return str(ip)
        nearest_trusted = str(ip)
    return nearest_trusted


def client_address_of(meta: Mapping[str, Any]) -> str:
    """The client address of a WSGI environ or a Django ``request.META``."""
    return client_address(
        str(meta.get("REMOTE_ADDR") or ""), str(meta.get("HTTP_X_FORWARDED_FOR") or ""), configured_networks()
    )
