"""EC2 instance metadata (IMDS): spot interruption, rebalance recommendation, scheduled maintenance.

The traps, as aws-node-termination-handler met them: a 404 body may be HTML; a
401 means the IMDSv2 token expired (get a new one once and retry); inside a
container with the hop limit at 1 the token PUT never gets an answer — then we
use IMDSv1 and *stay* there, so later polls do not pay the timeout again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone

from .fetch import EndpointTimeout, Response, request
from .model import Action, Notice
from .source import NoticeSource

log = logging.getLogger("jupyter_spot.notice")

ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
MODE_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"  # "IPv6" on IPv6-only instances, as in the SDKs
DEFAULT_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
MAINTENANCE_PATH = "/latest/meta-data/events/maintenance/scheduled"
REFRESH_MARGIN = 15.0  # seconds before expiry a token is replaced
# Maintenance codes and what they do to the VM's memory.
_MAINTENANCE_ACTIONS = {
    "instance-stop": "stop",
    "instance-retirement": "terminate",
    "instance-reboot": "stop",
    "system-reboot": "stop",
    "system-maintenance": "stop",
}


class MetadataError(OSError):
    """IMDS answered, but not with anything we can use (5xx, 403, garbage)."""


def parse_time(text: str) -> datetime | None:
    """IMDS times: RFC 3339 ``2026-11-29T05:00:00Z`` or maintenance's ``21 Jan 2019 09:00:43 GMT``."""
    text = text.strip()
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ", "%d %b %Y %H:%M:%S GMT"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class AWSSource(NoticeSource):
    """Polls IMDS; IMDSv2 when it can, IMDSv1 when the token PUT gets no answer."""

    name = "aws"

    def __init__(
        self,
        endpoint: str | None = None,
        interval: float = 5.0,
        timeout: float = 1.0,
        token_ttl: int = 21600,
        maintenance: bool = True,
    ) -> None:
        ipv6 = os.environ.get(MODE_ENV, "").lower() == "ipv6"
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or (IPV6_ENDPOINT if ipv6 else DEFAULT_ENDPOINT)
        self.interval = interval
        self.timeout = timeout
        self.token_ttl = token_ttl
        self.maintenance = maintenance
        self.imdsv1_only = False  # set for good once a token PUT times out
        self._token = ""
        self._token_expires = 0.0

    # -- token -------------------------------------------------------------
    def _fetch_token(self) -> str:
        """A fresh IMDSv2 token, or "" when this instance must use IMDSv1 from now on."""
        try:
            resp = request(
                self.endpoint,
                "PUT",
                TOKEN_PATH,
                headers={TOKEN_TTL_HEADER: str(self.token_ttl)},
                timeout=self.timeout,
            )
        except EndpointTimeout:
            log.warning(
                "IMDSv2 token request to %s got no answer in %g s; using IMDSv1 from now on "
                "(in a container, raise the instance's metadata hop limit to 2)",
                self.endpoint,
                self.timeout,
            )
            self.imdsv1_only = True
            return ""
        if resp.status in (403, 404, 405):  # IMDSv2 not offered here (old IMDS or a proxy)
            self.imdsv1_only = True
            return ""
        if resp.status != 200:
            raise MetadataError(f"IMDS token PUT answered {resp.status}")
        try:
            ttl = float(resp.headers.get(TOKEN_TTL_HEADER.lower(), self.token_ttl))
        except ValueError:
            ttl = float(self.token_ttl)
        self._token_expires = time.monotonic() + ttl
        return resp.text().strip()

    def _get(self, path: str) -> Response:
        """GET with the token; on 401 get a new token once and retry."""
        for attempt in range(2):
            headers = {}
            if not self.imdsv1_only:
                if not self._token or time.monotonic() > self._token_expires - REFRESH_MARGIN:
                    self._token = self._fetch_token()
                if self._token:
                    headers[TOKEN_HEADER] = self._token
            resp = request(self.endpoint, "GET", path, headers=headers, timeout=self.timeout)
            if resp.status == 401 and self.imdsv1_only:
                raise MetadataError(
                    "IMDS requires IMDSv2 but the token request gets no answer: "
                    "raise the instance's metadata hop limit to 2"
                )
            if resp.status == 401 and attempt == 0:
                self._token = ""  # expired or revoked: one new token, one retry
                continue
            return resp
        return resp

    def _get_json(self, path: str) -> object | None:
        """Parsed JSON at ``path``; None for 404 (whatever its body — it may be HTML)."""
        resp = self._get(path)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise MetadataError(f"IMDS {path} answered {resp.status}")
        try:
            return json.loads(resp.body)
        except ValueError as e:
            raise MetadataError(f"IMDS {path} answered 200 with non-JSON: {resp.text()[:80]!r}") from e

    # -- notices -------------------------------------------------------------
    def poll(self) -> Notice | None:
        """Interruption first (most urgent), then maintenance, then the rebalance hint."""
        action = self._get_json(INSTANCE_ACTION_PATH)
        if isinstance(action, dict) and action.get("action"):
            said = str(action["action"]).lower()
            kind: Action = "stop" if said == "stop" else "hibernate" if said == "hibernate" else "terminate"
            deadline = parse_time(str(action.get("time", "")))
            return Notice(
                kind="interruption",
                action=kind,
                deadline=deadline,
                source=self.name,
                event_id="spot-itn-" + _digest(action),
                detail=json.dumps(action),
            )
        if self.maintenance:
            notice = self._maintenance()
            if notice:
                return notice
        rebalance = self._get_json(REBALANCE_PATH)
        if isinstance(rebalance, dict) and rebalance.get("noticeTime"):
            return Notice(
                kind="rebalance",
                action="terminate",
                deadline=None,
                source=self.name,
                event_id="rebalance-" + str(rebalance["noticeTime"]),
                detail=json.dumps(rebalance),
            )
        return None

    def _maintenance(self) -> Notice | None:
        events = self._get_json(MAINTENANCE_PATH)
        if not isinstance(events, list):
            return None
        for event in events:
            if not isinstance(event, dict) or event.get("State") in ("completed", "canceled"):
                continue
            code = str(event.get("Code", ""))
            return Notice(
                kind="maintenance",
                action=_MAINTENANCE_ACTIONS.get(code, "stop"),  # type: ignore[arg-type]
                deadline=parse_time(str(event.get("NotBefore", ""))),
                source=self.name,
                event_id=str(event.get("EventId") or _digest(event)),
                detail=f"{code}: {event.get('Description', '')}".strip(),
            )
        return None


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
