"""The metadata client's limits, against small real HTTP servers on 127.0.0.1 that misbehave:
one drips its answer, one sends a huge one, one answers a long poll at once."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from jupyter_spot.notice import NoticeWatcher
from jupyter_spot.notice.aws import AWSSource
from jupyter_spot.notice.azure import AzureSource
from jupyter_spot.notice.fetch import MAX_BODY, EndpointTimeout, ResponseTooLarge, request
from jupyter_spot.notice.gcp import GCPSource

pytestmark = pytest.mark.timeout(120)
MB = 1 << 20


class Misbehaving:
    """An HTTP endpoint on 127.0.0.1 that answers every request in one bad way, counting requests."""

    def __init__(self, answer: Any) -> None:
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer.lock:
                    outer.requests += 1
                self.request.settimeout(5)
                try:
                    self.request.recv(65536)  # the request (small: headers only)
                    answer(self.request)
                except OSError:
                    pass  # the client hung up: what a bounded client should do

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def drip_body(sock: socket.socket) -> None:
    """Headers at once, then a 40-byte body one byte every 0.5 s: 20 s in all."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
    for _ in range(40):
        sock.sendall(b"x")
        time.sleep(0.5)


def drip_headers(sock: socket.socket) -> None:
    """Even the status line comes one byte every 0.5 s."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
        sock.sendall(bytes([byte]))
        time.sleep(0.5)


def huge_body(declared: bool) -> Any:
    def answer(sock: socket.socket) -> None:
        length = f"Content-Length: {64 * MB}\r\n" if declared else "Connection: close\r\n"
        sock.sendall(f"HTTP/1.1 200 OK\r\n{length}\r\n".encode())
        chunk = b"0" * MB
        for _ in range(64):
            sock.sendall(chunk)

    return answer


def instant(body: bytes, status: str = "200 OK", etag: str = "abc") -> Any:
    def answer(sock: socket.socket) -> None:
        sock.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nETag: {etag}\r\n"
            "Metadata-Flavor: Google\r\nConnection: close\r\n\r\n".encode() + body
        )

    return answer


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Iterator[Misbehaving]:
    server = Misbehaving(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("endpoint", [drip_body, drip_headers], indirect=True, ids=["body", "headers"])
def test_a_dripping_endpoint_cannot_hold_a_request_past_its_deadline(endpoint: Misbehaving) -> None:
    started = time.monotonic()
    with pytest.raises(EndpointTimeout):
        request(endpoint.url, "GET", "/latest/meta-data/spot/instance-action", timeout=1.0)
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("endpoint", [drip_body], indirect=True)
def test_a_dripping_imds_holds_one_aws_poll_for_seconds_not_minutes(endpoint: Misbehaving) -> None:
    source = AWSSource(endpoint=endpoint.url, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(OSError):
        source.poll()  # token PUT and GET both drip: IMDSv1 from now on, then the GET times out
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("endpoint", [huge_body(True), huge_body(False)], indirect=True, ids=["declared", "streamed"])
def test_a_huge_answer_is_refused_without_reading_it(endpoint: Misbehaving) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLarge):
            request(endpoint.url, "GET", "/metadata/scheduledevents", timeout=10.0)
        with pytest.raises(ResponseTooLarge):
            AzureSource(endpoint=endpoint.url, timeout=10.0).poll()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_BODY + 2 * MB, peak  # the 64 MB never enter memory (the test server's own 1 MB chunk does)


@pytest.mark.parametrize("endpoint", [instant(b"FALSE")], indirect=True)
def test_a_gcp_endpoint_ignoring_wait_for_change_is_not_polled_in_a_tight_loop(endpoint: Misbehaving) -> None:
    watcher = NoticeWatcher([GCPSource(host=endpoint.host, wait=30.0, timeout=1.0)]).start()
    window = 3.0
    try:
        threading.Event().wait(window)  # a window to count requests in, not a wait for something to happen
    finally:
        watcher.stop()
    # Two keys, a poll at most every MIN_POLL_GAP (0.5 s): about 14; the tight loop made ~2,000.
    assert 2 <= endpoint.requests <= 2 * (window / 0.5 + 2), endpoint.requests


@pytest.mark.parametrize("endpoint", [instant(b"", status="500 Internal Server Error")], indirect=True)
def test_an_erroring_endpoint_is_polled_ever_less_often(endpoint: Misbehaving) -> None:
    watcher = NoticeWatcher([AWSSource(endpoint=endpoint.url, interval=0.0, timeout=1.0)]).start()
    try:
        threading.Event().wait(3.0)
    finally:
        watcher.stop()
    # Backoff after the first failure: 2 s, then 4 s; each poll is a token PUT (+ its retry as IMDSv1 GETs).
    assert 1 <= endpoint.requests <= 8, endpoint.requests
