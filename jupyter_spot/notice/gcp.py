"""GCE metadata: ``instance/preempted`` turns TRUE about 30 s before a Spot VM is stopped.

``wait_for_change`` makes the request hang until the value changes (or
``timeout_sec`` passes), so the notice arrives the moment it is set, with no
polling interval at all; ``last_etag`` makes sure a change between two waits
is not missed.
"""

from __future__ import annotations

import os

from .fetch import request
from .model import Notice, deadline_in
from .source import NoticeSource

HOST_ENV = "GCE_METADATA_HOST"
DEFAULT_HOST = "metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
LEAD_TIME = 30.0  # seconds between preempted=TRUE and the ACPI soft-off


class MetadataError(OSError):
    """The metadata server answered with something other than TRUE/FALSE."""


class GCPSource(NoticeSource):
    """Hanging GET on ``instance/preempted``; each ``poll`` waits up to ``wait`` seconds."""

    name = "gcp"
    interval = 0.0

    def __init__(self, host: str | None = None, wait: float = 30.0, timeout: float = 1.0) -> None:
        self.endpoint = "http://" + (host or os.environ.get(HOST_ENV) or DEFAULT_HOST)
        self.wait = wait
        self.timeout = timeout
        self._etag = ""

    def poll(self) -> Notice | None:
        path = f"{PREEMPTED_PATH}?wait_for_change=true&timeout_sec={max(1, int(self.wait))}"
        if self._etag:
            path += f"&last_etag={self._etag}"
        resp = request(
            self.endpoint,
            "GET",
            path,
            headers={"Metadata-Flavor": "Google"},
            timeout=self.wait + self.timeout,
        )
        if resp.status != 200:
            raise MetadataError(f"GCE metadata {PREEMPTED_PATH} answered {resp.status}")
        self._etag = resp.headers.get("etag", "")
        value = resp.text().strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise MetadataError(f"GCE metadata {PREEMPTED_PATH} answered {value[:40]!r}")
        return Notice(
            kind="interruption",
            action="preempt",
            deadline=deadline_in(LEAD_TIME),
            source=self.name,
            event_id="preempted",
        )
