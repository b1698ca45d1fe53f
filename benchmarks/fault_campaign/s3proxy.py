"""An HTTP proxy in front of moto that answers some requests the way a struggling S3 does.

A TCP proxy (tests/s3_server.py's FaultProxy) can only cut connections; S3 also
answers ``503 SlowDown`` when throttling and ``500 InternalError`` now and then —
sometimes *after* it has done the work. This proxy forwards every request to
moto and, for a share of them (``error_rate``, drawn from a seeded generator),
answers one of those instead: before forwarding (nothing happened) or after
(the request took effect but the client is told it failed).
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)
#: Headers that describe one hop, not the request; never forwarded.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}


class ErrorProxy:
    """``url`` forwards to ``upstream_port``; set ``error_rate`` (0..1) and ``seed`` per trial."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.error_rate = 0.0
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self.injected: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>campaign</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault is not None and fault[0] == "before":
                    self._error(*fault[1])
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                if fault is not None:  # "after": S3 did the work, the client hears it failed
                    self._error(*fault[1])
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                # a HEAD answer's length is the object's, not that of its (empty) body
                length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up on a connection (a killed kernel) is part of the game

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def configure(self, error_rate: float, seed: int) -> None:
        with self._lock:
            self.error_rate = error_rate
            self._rng = random.Random(seed)

    def _draw(self) -> tuple[str, tuple[int, str, str]] | None:
        with self._lock:
            if self.error_rate <= 0 or self._rng.random() >= self.error_rate:
                return None
            error = self._rng.choice(ERRORS)
            when = "after" if self._rng.random() < 0.25 else "before"
            name = f"{error[0]} {error[1]} ({when})"
            self.injected[name] = self.injected.get(name, 0) + 1
            return when, error

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
