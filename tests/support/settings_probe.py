"""Read settings as a fresh process would, with a given environment (production checks run at import)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.servers import ROOT


def run_python(
    code: str, env: dict[str, str], *, drop: set[str] | frozenset[str] = frozenset()
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter with apimgmt's settings module, ``env`` on top of this environment.

    Variables named in ``drop`` and the test run's own Django/pytest variables are not passed on.
    """
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("DJANGO", "APIMGMT", "PYTEST"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "apimgmt.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
