"""promtool for tests: from Debian's prometheus package (apt-get download + dpkg -x into a cache), never installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CACHE_DIR = Path(os.environ.get("APIMGMT_TEST_CACHE", Path.home() / ".cache" / "apimgmt-tests")) / "prometheus-deb"


def promtool() -> Path:
    """Path to a promtool binary; downloads the Debian package once (skips the test when that is impossible)."""
    found = shutil.which("promtool")
    if found:
        return Path(found)
    binary = CACHE_DIR / "root" / "usr" / "bin" / "promtool"
    if binary.exists():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as download:
        # apt's sandbox user cannot write into root's temp dirs; the download is verified by apt either way.
        os.chmod(download, 0o777)
        fetched = subprocess.run(
            ["apt-get", "download", "prometheus"], cwd=download, capture_output=True, text=True, timeout=300
        )
        debs = list(Path(download).glob("prometheus_*.deb"))
        if fetched.returncode != 0 or not debs:
            pytest.skip(f"promtool unavailable: `apt-get download prometheus` failed: {fetched.stderr.strip()[:300]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(CACHE_DIR / "root")], check=True, timeout=120)
    if not binary.exists():
        pytest.skip("promtool unavailable: the prometheus package has no usr/bin/promtool")
    return binary
