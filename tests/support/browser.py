"""Debian's chromium driven by Playwright, the one way every browser test starts a browser (never a download)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def require_chromium() -> None:
    """Skip the calling test module when playwright or Debian's chromium is missing."""
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)", allow_module_level=True)


def launch(playwright: Any) -> Any:
    """A headless chromium browser from ``sync_playwright()``'s object."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def publish_echo_api(tenant: Any, upstream_url: str) -> Any:
    """The browser tests' "Echo" API: active at /echo in front of ``upstream_url``, with a one-operation OpenAPI doc."""
    from apimgmt import services

    return services.api_create(
        tenant=tenant,
        api_name="Echo",
        description="Answers with the request it received. Good for a first call.",
        base_path="/echo",
        upstream_url=upstream_url,
        status="active",
        openapi_spec={
            "openapi": "3.0.3",
            "info": {"title": "Echo", "version": "1.0"},
            "paths": {
                "/hello": {
                    "get": {
                        "summary": "Echo the request",
                        "responses": {"200": {"description": "The request, as JSON"}},
                    }
                }
            },
        },
        actor=None,
    )


@contextmanager
def app_and_browser(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, Any]]:
    """apimgmt under gunicorn (2 workers, gunicorn.conf.py, static files served) and a chromium browser."""
    from playwright.sync_api import sync_playwright

    from tests.support.servers import ROOT, gunicorn

    with (
        gunicorn(
            env,
            app="tests.portal.static_wsgi:application",
            workers=2,
            extra_args=["--config", str(ROOT / "gunicorn.conf.py")],
            log_path=log_path,
        ) as base,
        sync_playwright() as pw,
    ):
        browser = launch(pw)
        try:
            yield base, browser
        finally:
            browser.close()


def screenshot_dir(name: str) -> Path:
    """Where a browser test keeps its screenshots as test artifacts: ``$TEST_OUTPUT_DIR`` (default ./test-output,
    git-ignored) / screenshots / ``name``; emptied first so a folder shows one run."""
    import os
    import shutil

    from tests.support.servers import ROOT

    folder = Path(os.environ.get("TEST_OUTPUT_DIR") or ROOT / "test-output") / "screenshots" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
