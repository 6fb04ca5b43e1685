"""Scale-out tests: the in-process gateway and recording upstream of tests/gateway, and real Redis topologies."""

from __future__ import annotations

from tests.gateway.conftest import _allow_private_upstreams, gateway, upstream

__all__ = ["_allow_private_upstreams", "gateway", "upstream"]
