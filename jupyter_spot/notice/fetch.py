"""Tiny blocking HTTP for metadata services: short deadlines, small answers, no retries, no proxies.

Metadata endpoints are link-local; a proxy from the environment (``HTTP_PROXY``)
must never see these requests, and a slow answer is as bad as none. A socket
timeout alone bounds each read, not the request: an endpoint dripping one byte
every half second never trips it. So each request has one overall deadline, and
its answer a size cap — the notices we read are a few hundred bytes.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from dataclasses import dataclass

#: The largest answer read from a metadata endpoint, in bytes.
MAX_BODY = 16 << 10


class EndpointUnreachable(OSError):
    """The metadata endpoint did not answer (refused, reset, or timed out)."""


class EndpointTimeout(EndpointUnreachable):
    """The endpoint accepted the connection (or not) but gave no whole answer in time."""


class ResponseTooLarge(EndpointUnreachable):
    """The endpoint's answer is bigger than any metadata answer should be; it is not read."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def split_endpoint(endpoint: str) -> tuple[str, int, str]:
    """``http://host:port/prefix`` (or ``host:port``) → host, port, path prefix."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"metadata endpoint must be http://host[:port], not {endpoint!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def request(
    endpoint: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 1.0,
    max_body: int = MAX_BODY,
) -> Response:
    """One request on a fresh connection, done — connect, send, headers, body — within ``timeout`` seconds.

    Raises EndpointTimeout past the deadline, ResponseTooLarge for an answer over
    ``max_body`` bytes, EndpointUnreachable for anything else that goes wrong.
    """
    host, port, prefix = split_endpoint(endpoint)
    what = f"{method} {endpoint}{path}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    expired = threading.Event()

    def cut_off() -> None:  # wakes a read blocked on a slow endpoint: it sees the end of the stream
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    deadline = threading.Timer(timeout, cut_off)
    deadline.daemon = True
    deadline.start()
    try:
        conn.request(method, prefix + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        length = resp.getheader("content-length", "")
        if length.isdigit() and int(length) > max_body:
            raise ResponseTooLarge(f"{what}: the answer is {int(length)} bytes (at most {max_body} are read)")
        data = resp.read(max_body + 1)
        if len(data) > max_body:
            raise ResponseTooLarge(f"{what}: the answer is over {max_body} bytes")
        if expired.is_set():  # the cut may look like a short answer that ended early
            raise EndpointTimeout(f"{what}: no whole answer in {timeout:g} s")
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    except EndpointUnreachable:
        raise
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise EndpointTimeout(f"{what}: no whole answer in {timeout:g} s") from e
        raise EndpointUnreachable(f"{what}: {e}") from e
    finally:
        deadline.cancel()
        conn.close()
