"""moto's standalone S3 server and a fault-injecting TCP proxy, both on 127.0.0.1.

Shared by the S3 tests and benchmarks/bench_s3.py.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from .ports import free_port


class MotoServer:
    """``python -m moto.server`` in a subprocess: its own process, so uploads use a second core."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dying NAT or a killed peer does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A TCP proxy to ``upstream`` that can refuse service or cut connections mid-request.

    * ``down = True``: every connection is reset at once (S3 unreachable).
    * ``cut_after(n_bytes, times, every)``: of the connections that send more
      than ``n_bytes`` upstream, every ``every``-th is reset right there — in the
      middle of a request body, like a dropped connection during an upload —
      ``times`` times in all (every=2: a retried request gets through).
    * ``lose_responses(times)``: the next ``times`` responses are dropped after
      S3 has done the work — the client cannot know its request succeeded.
    * ``hold_after(n_bytes)``: once more than ``n_bytes`` went upstream (over all
      connections), the proxy forwards nothing more (``held`` is set) until
      ``release()``: an upload the test knows to be in flight, for as long as it needs.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.down = False
        self.cuts_left = 0
        self.cut_bytes = 0
        self.cut_every = 1
        self.cuts_done = 0
        self._crossings = 0
        self.responses_to_lose = 0
        self.responses_lost = 0
        self.hold_bytes: int | None = None
        self._forwarded = 0
        self.held = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def cut_after(self, n_bytes: int, times: int, every: int = 1) -> None:
        with self._lock:
            self.cut_bytes, self.cuts_left, self.cut_every, self._crossings = n_bytes, times, every, 0

    def hold_after(self, n_bytes: int) -> None:
        self.held.clear()
        self._released.clear()
        self._forwarded = 0
        self.hold_bytes = n_bytes

    def _hold(self, n_bytes: int) -> None:
        with self._lock:
            self._forwarded += n_bytes
            over = self.hold_bytes is not None and self._forwarded > self.hold_bytes
        if over:
            self.held.set()
            self._released.wait()

    def release(self) -> None:
        self.hold_bytes = None
        self._released.set()

    def lose_responses(self, times: int) -> None:
        with self._lock:
            self.responses_to_lose = times

    def _lose_response(self) -> bool:
        with self._lock:
            if self.responses_to_lose <= 0:
                return False
            self.responses_to_lose -= 1
            self.responses_lost += 1
            return True

    def _take_cut(self) -> bool:
        with self._lock:
            self._crossings += 1
            if self.cuts_left <= 0 or (self._crossings - 1) % self.cut_every:
                return False
            self.cuts_left -= 1
            self.cuts_done += 1
            return True

    def _serve(self, client: socket.socket) -> None:
        if self.down:
            _abort(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pump_back() -> None:
            try:
                while data := upstream.recv(1 << 16):
                    if self.responses_to_lose > 0 and self._lose_response():
                        _abort(client)
                        _abort(upstream)
                        return
                    client.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=pump_back, daemon=True)
        back.start()
        sent, crossed = 0, False
        try:
            while data := client.recv(1 << 16):
                sent += len(data)
                if self.cuts_left > 0 and not crossed and sent > self.cut_bytes:
                    crossed = True
                    if self._take_cut():
                        _abort(upstream)
                        _abort(client)
                        return
                if self.hold_bytes is not None:
                    self._hold(len(data))
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            _abort(upstream)
        back.join()
        client.close()
        upstream.close()

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


class RequestLog:
    """Every request a boto3 client sends, counted through botocore's ``before-send`` event."""

    def __init__(self, client: Any) -> None:
        self.requests: list[tuple[str, str, int]] = []  # (operation, url, body bytes)
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3.*", self._record)

    def _record(self, request: Any, event_name: str, **_: Any) -> None:
        headers = request.headers
        size = int(headers.get("x-amz-decoded-content-length") or headers.get("Content-Length") or 0)
        with self._lock:
            self.requests.append((event_name.rsplit(".", 1)[-1], request.url, size))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, operation: str | None = None) -> int:
        return sum(1 for op, _, _ in self.requests if operation in (None, op))

    def bytes_sent(self) -> int:
        return sum(size for _, _, size in self.requests)
