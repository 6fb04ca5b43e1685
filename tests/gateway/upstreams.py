"""Loopback upstreams for gateway tests: a recording HTTP server whose answers each test chooses."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Seen:
    method: str
    path: str  # the raw request target, exactly as received
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "application/json")])
    body: bytes = b'{"ok": true}'


class Recorder:
    """Records every request; ``respond`` decides the answer (default 200 JSON)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.respond: Callable[[Seen], Answer] = lambda seen: Answer()
        self.url = ""
        self.port = 0

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def _handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                body = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                list(self.headers.items()),
                body,
            )
            recorder.seen.append(seen)
            answer = recorder.respond(seen)
            self.send_response(answer.status)
            names = {k.lower() for k, _ in answer.headers}
            for name, value in answer.headers:
                self.send_header(name, value)
            if "content-length" not in names and answer.status not in (204, 304):
                self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if self.command != "HEAD" and answer.status not in (204, 304):
                self.wfile.write(answer.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    return Handler


@contextmanager
def recording_upstream() -> Iterator[Recorder]:
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    server.daemon_threads = True
    recorder.port = server.server_port
    recorder.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def raw_upstream(behaviour: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server that hands each accepted connection to ``behaviour`` (stall, trickle, garbage...)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conns.append(conn)
            threading.Thread(target=_run, args=(conn,), daemon=True).start()

    def _run(conn: socket.socket) -> None:
        with suppress(OSError):
            behaviour(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(1)
        listener.close()
        for conn in conns:
            with suppress(OSError):
                conn.close()


def read_request_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def stall(conn: socket.socket) -> None:
    read_request_head(conn)
    time.sleep(30)


def trickle(conn: socket.socket) -> None:
    """Answer one byte every 0.2 s, forever: no single read ever times out."""
    read_request_head(conn)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nX-Slow: " + b"x" * 1000
    for byte in head:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def garbage(conn: socket.socket) -> None:
    read_request_head(conn)
    conn.sendall(b"this is not HTTP\r\n\r\n")
    conn.close()


@dataclass
class Received:
    """What an ``answering`` upstream got: connections accepted, and the bodies of the requests it got whole."""

    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)


def answering(received: Received) -> Callable[[socket.socket], None]:
    """A behaviour for raw_upstream: read each request (its body by Content-Length) and answer 200 "ok".

    A request cut short (the connection closed before the end of its body) is never answered nor recorded.
    """

    def behaviour(conn: socket.socket) -> None:
        received.connections += 1
        while True:
            data = read_request_head(conn)
            head, sep, body = data.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            received.bodies.append(body)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return behaviour


def self_signed_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away certificate (and its key) for DNS name ``name``, made with the openssl command line."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_answering(cert: Path, key: Path, server_names: list[str | None]) -> Callable[[socket.socket], None]:
    """A behaviour for raw_upstream: TLS with ``cert``, recording the SNI name asked for, then answer 200 "ok"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def record(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
        server_names.append(name)

    context.sni_callback = record  # type: ignore[assignment]

    def behaviour(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            read_request_head(tls)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return behaviour
