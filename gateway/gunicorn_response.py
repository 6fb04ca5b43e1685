"""A gunicorn response writer that sends the status line, headers and the first body chunk in one write."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from gunicorn import util
from gunicorn.http import message, wsgi

logger = logging.getLogger(__name__)

# Header names that passed gunicorn's checks in this worker, as they are written (names repeat from one response to
# the next: the same dozen or so per API), each with its lower-case form.
_checked_names: dict[str, str] = {}
# Names gunicorn drops from an application's headers (it writes its own Server, Date and Connection); Connection and
# Upgrade, which it also reads, always take the stock path.
_DROPPED = frozenset(util.hop_headers) - {"connection", "upgrade"}
_STOCK_ONLY = frozenset({"connection", "upgrade"})
MAX_CHECKED_NAMES = 4096
# Any character gunicorn's HEADER_VALUE_RE does not allow in a header value (CR and LF among them).
_BAD_VALUE_CHAR = re.compile(r"[^ \t\x21-\x7e\x80-\xff]")


class CoalescingResponse(wsgi.Response):
    """gunicorn's HTTP/1.1 response, but a small body leaves in the same send() as the header block.

    Stock gunicorn writes the header block and each body chunk separately: for a typical API answer that is two
    syscalls and two wake-ups of the client instead of one (about 8 % of a gateway worker's samples under wrk,
    and measurable p50 at one connection). Everything gunicorn decides (framing, keep-alive, HEAD/204/304 without
    a body, chunked responses, truncation to Content-Length) is left to the stock code: only the first write of
    a non-chunked response whose bytes fit the declared length takes the combined path.
    """

    # Set by gunicorn's Response.__init__ / start_response (gunicorn ships no type hints).
    headers_sent: bool
    chunked: bool
    _omits_body: bool
    response_length: int | None
    sent: int
    headers: list[tuple[str, str]]
    sock: Any

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        """gunicorn's header checks and bookkeeping, with less work per header: a name is checked once per worker,
        every value in one regex search. Anything else (a name not seen yet, a hop-by-hop header, a value that is
        not a string or has a character gunicorn refuses) takes the stock path, which checks, raises or drops it.

        About 7 % of a worker's samples on a cached answer (eleven headers) went to the stock per-header checks.
        """
        known = _checked_names
        lowers = []
        for name, value in headers:
            # One read per name: another thread (gthread workers) may clear the memory between two reads.
            lower = known.get(name) if type(value) is str else None
            if lower is None:
                self._stock_process_headers(headers)
                return
            lowers.append(lower)
        if _BAD_VALUE_CHAR.search("".join([value for _name, value in headers])):
            super().process_headers(headers)  # raises InvalidResponseHeader, naming the header
            return
        out = self.headers
        for (name, value), lower in zip(headers, lowers, strict=True):
            if lower in _DROPPED:
                continue
            value = value.strip(" \t")
            if lower == "content-length":
                self.response_length = int(value)
            out.append((name, value))

    def _stock_process_headers(self, headers: list[tuple[str, str]]) -> None:
        super().process_headers(headers)
        # Every name passed: they may take the fast path from now on (but Connection and Upgrade, which gunicorn reads).
        if len(_checked_names) >= MAX_CHECKED_NAMES:
            _checked_names.clear()
        for name, _value in headers:
            lower = name.lower()
            if lower not in _STOCK_ONLY and lower == lower.strip():
                _checked_names[name] = lower

    def write(self, arg: Any) -> None:
        if (
            self.headers_sent
            or self.chunked
            or self._omits_body
            or type(arg) is not bytes
            or not arg
            or (self.response_length is not None and len(arg) > self.response_length)
        ):
            super().write(arg)
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        self.headers_sent = True
        self.sent += len(arg)
        util.write(self.sock, head + arg)


_date_second = -1
_date_text = ""


def http_date(timestamp: float | None = None) -> str:
    """gunicorn's Date header value, formatted once per second instead of once per response (same text)."""
    global _date_second, _date_text
    if timestamp is not None:
        return _stock_http_date(timestamp)
    second = int(time.time())
    if second != _date_second:
        _date_text = _stock_http_date(second)
        _date_second = second
    return _date_text


_stock_http_date = util.http_date
_stock_base_environ = wsgi.base_environ
_base_environs: dict[int, tuple[Any, dict[str, Any]]] = {}


def base_environ(cfg: Any) -> dict[str, Any]:
    """gunicorn's per-request base environ, copied from one built per config.

    Stock gunicorn builds a new wsgi.errors wrapper per request (a logging.getLogger() call under the logging
    lock, a scan of the error log's handlers); one wrapper per config writes to the same streams. Only when the
    error log is stderr: a log file's stream is replaced when gunicorn reopens its files (USR1), and a wrapper
    kept from before would write to the closed one.
    """
    if cfg.errorlog != "-":
        return _stock_base_environ(cfg)
    entry = _base_environs.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        entry = (cfg, _stock_base_environ(cfg))
        _base_environs.clear()
        _base_environs[id(cfg)] = entry
    return entry[1].copy()


_stock_ip_in_allow_list = message._ip_in_allow_list
_allow_results: dict[tuple[str, int], tuple[Any, bool]] = {}


def ip_in_allow_list(ip_str: str, allow_list: Any, networks: Any) -> bool:
    """gunicorn's forwarded_allow_ips check, remembered per peer address (it parses the address every request)."""
    key = (ip_str, id(allow_list))
    cached = _allow_results.get(key)
    if cached is not None and cached[0] is allow_list:
        return cached[1]
    result = bool(_stock_ip_in_allow_list(ip_str, allow_list, networks))
    if len(_allow_results) >= 4096:
        _allow_results.clear()
    _allow_results[key] = (allow_list, result)
    return result


def install() -> bool:
    """Make gunicorn build CoalescingResponse for HTTP/1.1 requests in this (worker) process.

    Also swaps in the per-second Date header, the shared base environ and the remembered forwarded_allow_ips
    check above: same bytes, same environ keys and values, less work per request.
    """
    needed = ("default_headers", "headers_sent", "_omits_body", "response_length")
    probe = wsgi.Response.__init__.__code__.co_names + tuple(vars(wsgi.Response))
    if not all(name in probe for name in needed):
        logger.warning("gunicorn's Response changed shape; keeping its stock writer")
        return False
    wsgi.Response = CoalescingResponse
    if util.http_date is _stock_http_date:
        util.http_date = http_date
    if wsgi.base_environ is _stock_base_environ:
        wsgi.base_environ = base_environ
    if message._ip_in_allow_list is _stock_ip_in_allow_list:
        message._ip_in_allow_list = ip_in_allow_list
    return True
