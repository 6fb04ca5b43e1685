"""What one process serves, chosen by APIMGMT_ROLE: the role names and what each includes, written once.

settings.py validates the variable with it; settings (the gateway middleware), urls.py (admin, management API,
portal), wsgi.py, gateway/apps.py and gunicorn.conf.py ask it whether to mount their part. Plain Python: settings
imports it before Django is set up.
"""

from __future__ import annotations

from enum import StrEnum


class ProcessRole(StrEnum):
    ALL = "all"  # gateway and control plane in one process (development, small installs)
    GATEWAY = "gateway"  # API traffic, probes and metrics only
    CONTROL = "control"  # admin, portal and management API; never proxies


def serves_gateway(role: str) -> bool:
    """Does a process in this role proxy API traffic?"""
    return role in (ProcessRole.ALL, ProcessRole.GATEWAY)


def serves_control_plane(role: str) -> bool:
    """Does a process in this role serve the admin, the management API and the portal?"""
    return role in (ProcessRole.ALL, ProcessRole.CONTROL)
