"""Long-lived responses (Server-Sent Events, chunked bodies without a length): passed on chunk by chunk, held to
an idle gap between chunks (the API's ``stream_timeout``) instead of the total deadline.

The total deadline is right for request/response APIs and wrong for a stream that is meant to stay open: an API
that sets ``stream_timeout`` lets such a response run as long as the upstream keeps sending, and cuts it when the
upstream falls silent for longer than that. Until the response headers arrive the total deadline still applies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from gateway.http1 import Http1Response

CHUNK_SIZE = 64 * 1024


def is_stream(response: Any) -> bool:
    """A response meant to stay open: ``text/event-stream``, or a body without a declared length."""
    if response.status in (204, 304) or response.status < 200:
        return False
    if isinstance(response, Http1Response):
        content_type = next((v for n, v in response.header_list if n.lower() == "content-type"), "")
    else:
        content_type = response.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return True
    return response.length_remaining is None


def chunks(upstream: Any, stream_timeout: float) -> Iterator[bytes]:
    """The body as the upstream flushes it; the watch's deadline moves ``stream_timeout`` past each chunk.

    ``upstream`` is proxy.UpstreamResponse. Time spent handing a chunk to the client does not count against the
    upstream (the deadline is set again once the client has taken it).
    """
    watch = upstream.watch
    response = upstream.response
    watch.deadline = time.monotonic() + stream_timeout
    _set_read_timeout(response, stream_timeout)
    if isinstance(response, Http1Response) or response.chunked:
        # Both hand over each chunk (or each read of a connection-delimited body) as soon as it arrives.
        source: Iterator[bytes] = response.stream(CHUNK_SIZE, decode_content=False)
    else:
        source = _read1(response)
    for chunk in source:
        watch.deadline = time.monotonic() + stream_timeout
        yield chunk
        watch.deadline = time.monotonic() + stream_timeout


def _read1(response: Any) -> Iterator[bytes]:
    """urllib3's body delimited by the end of the connection, one read at a time (stream() waits for 64 KiB)."""
    while True:
        data = response.read1(CHUNK_SIZE, decode_content=False)
        if not data:
            return
        yield data


def _set_read_timeout(response: Any, seconds: float) -> None:
    """Each read may wait as long as the stream's gap (the exchange's read timeout was meant for the headers)."""
    sock = getattr(response, "_sock", None)
    if sock is None:
        connection = getattr(response, "connection", None)
        sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)
