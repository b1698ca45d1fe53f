"""Tiny blocking HTTP for metadata services: short timeouts, no retries, no proxies.

Metadata endpoints are link-local; a proxy from the environment (``HTTP_PROXY``)
must never see these requests, and a slow answer is as bad as none.
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass


class EndpointUnreachable(OSError):
    """The metadata endpoint did not answer (refused, reset, or timed out)."""


class EndpointTimeout(EndpointUnreachable):
    """The endpoint accepted the connection (or not) but gave no answer in time."""


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
) -> Response:
    """One request on a fresh connection; raises EndpointUnreachable/EndpointTimeout."""
    host, port, prefix = split_endpoint(endpoint)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, prefix + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    except TimeoutError as e:
        raise EndpointTimeout(f"{method} {endpoint}{path}: no answer in {timeout:g} s") from e
    except (OSError, http.client.HTTPException) as e:
        raise EndpointUnreachable(f"{method} {endpoint}{path}: {e}") from e
    finally:
        conn.close()
