"""APIMGMT_ROLE: each role mounts exactly its surfaces, decided in one place (apimgmt.process_role)."""

from __future__ import annotations

import json

import pytest

from apimgmt.process_role import ProcessRole
from tests.support.settings_probe import run_python

PROBE = """
import json
import django
django.setup()
from django.conf import settings
from django.urls import Resolver404, resolve
import apimgmt.wsgi

def routed(path):
    try:
        resolve(path)
        return True
    except Resolver404:
        return False

print(json.dumps({
    "gateway_middleware": "gateway.middleware.GatewayMiddleware" in settings.MIDDLEWARE,
    "gateway_wsgi": type(apimgmt.wsgi.application).__name__ == "GatewayApplication",
    "admin": routed("/admin/"),
    "portal": routed("/portal/acme/"),
    "mgmt": routed("/mgmt/v1/"),
    "health": routed("/health"),
}))
"""

SURFACES = {
    ProcessRole.ALL: {"gateway": True, "control": True},
    ProcessRole.GATEWAY: {"gateway": True, "control": False},
    ProcessRole.CONTROL: {"gateway": False, "control": True},
}


@pytest.mark.parametrize("role", list(ProcessRole), ids=str)
def test_each_role_mounts_exactly_its_surfaces(role: ProcessRole) -> None:
    result = run_python(PROBE, {"DEBUG": "1", "APIMGMT_ROLE": role.value})
    assert result.returncode == 0, result.stderr
    mounted = json.loads(result.stdout.strip().splitlines()[-1])
    expected = SURFACES[role]
    assert mounted == {
        "gateway_middleware": expected["gateway"],
        "gateway_wsgi": expected["gateway"],
        "admin": expected["control"],
        "portal": expected["control"],
        "mgmt": expected["control"],
        "health": True,
    }


def test_an_unknown_role_is_refused_with_every_valid_name() -> None:
    result = run_python("import django; django.setup()", {"DEBUG": "1", "APIMGMT_ROLE": "proxy"})
    assert result.returncode != 0
    assert "APIMGMT_ROLE must be one of all, gateway, control (got 'proxy')" in result.stderr
