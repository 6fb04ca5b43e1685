"""Finds secrets (API keys, management tokens, passwords, Authorization headers) in captured log lines."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from apimgmt.logs import JsonFormatter, RequestIdFilter

# Log files of servers the tests started (gunicorn, flusher subprocesses) register here.
SERVER_LOG_DIR = Path(tempfile.mkdtemp(prefix="apimgmt-test-logs-"))
_extra_logs: list[Path] = []

# A key prefix (ak_live_ + 4 characters) may be logged; anything longer is (part of) a key.
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "API key": re.compile(r"ak_live_[0-9A-Za-z]{8,}"),
    "management token": re.compile(r"amt_[0-9A-Za-z_-]{16,}"),
    "Authorization header": re.compile(r"(?i)authorization[\"':= ]+(?:token|bearer|basic)\s+\S+"),
    "API key header": re.compile(r"(?i)x-api-key[\"':= ]+\S{13,}"),
    "password": re.compile(r"[A-Za-z]+-password-123|(?i:\"password\"\s*:\s*\"[^\"]+\")"),
    "session cookie": re.compile(r"sessionid=[a-z0-9]{16,}"),
    # A JWT's header and claims: base64url of '{"' twice (a signature-less or truncated token counts too).
    "JWT": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\."),
}


def find_secrets(text: str) -> list[str]:
    """Names of the secret kinds found in text, with the line they were found on."""
    found = []
    for line in text.splitlines():
        for kind, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                found.append(f"{kind}: {line[:300]}")
    return found


def register_log(path: Path) -> None:
    _extra_logs.append(path)


class CapturingHandler(logging.Handler):
    """Keeps every formatted log line of this process (as the console handler would write it)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must not break the test that logged it
            self.handleError(record)


def install_capture() -> CapturingHandler:
    handler = CapturingHandler()
    logging.getLogger().addHandler(handler)
    return handler


def leaked_secrets(handler: CapturingHandler) -> list[str]:
    logging.getLogger().removeHandler(handler)
    leaks = find_secrets("\n".join(handler.lines))
    for path in [*sorted(SERVER_LOG_DIR.glob("*.log")), *_extra_logs]:
        if path.exists():
            leaks += [f"{path.name}: {leak}" for leak in find_secrets(path.read_text(errors="replace"))]
    return leaks
