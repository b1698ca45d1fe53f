"""Azure Scheduled Events: ``Preempt`` (Spot eviction) and ``Terminate``, at least 30 s ahead.

Once our flush is done we approve the event (``StartRequests``) so Azure may
go ahead at once instead of waiting out ``NotBefore`` — the VM is gone either
way; approving only shortens the time the user waits for the new one.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from email.utils import parsedate_to_datetime

from .fetch import request
from .model import Notice
from .source import NoticeSource

log = logging.getLogger("jupyter_spot.notice")

ENDPOINT_ENV = "JUPYTER_SPOT_AZURE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
_ACTIONS = {"Preempt": ("interruption", "preempt"), "Terminate": ("interruption", "terminate")}
_MAINTENANCE = ("Reboot", "Redeploy")  # RAM is lost; "Freeze" pauses the VM for seconds and keeps it


class MetadataError(OSError):
    """The scheduled events endpoint answered, but not with events."""


class AzureSource(NoticeSource):
    """Polls Scheduled Events every second (Azure's advice) and approves handled events."""

    name = "azure"

    def __init__(self, endpoint: str | None = None, interval: float = 1.0, timeout: float = 1.0) -> None:
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.interval = interval
        self.timeout = timeout
        self._vm_name: str | None = None

    def _headers(self) -> dict[str, str]:
        return {"Metadata": "true"}

    def _this_vm(self) -> str:
        """This VM's name, to skip events for other VMs of the same availability set ("" = unknown)."""
        if self._vm_name is None:
            resp = request(self.endpoint, "GET", NAME_PATH, headers=self._headers(), timeout=self.timeout)
            self._vm_name = resp.text().strip() if resp.status == 200 else ""
        return self._vm_name

    def poll(self) -> Notice | None:
        resp = request(self.endpoint, "GET", EVENTS_PATH, headers=self._headers(), timeout=self.timeout)
        if resp.status != 200:
            raise MetadataError(f"Azure scheduled events answered {resp.status}")
        try:
            events = json.loads(resp.body).get("Events", [])
        except (ValueError, AttributeError) as e:
            raise MetadataError(f"Azure scheduled events answered non-JSON: {resp.text()[:80]!r}") from e
        vm = self._this_vm()
        found: list[Notice] = []
        for event in events:
            kind_action = _ACTIONS.get(event.get("EventType", ""))
            if kind_action is None and event.get("EventType") in _MAINTENANCE:
                kind_action = ("maintenance", "stop")
            if kind_action is None:
                continue
            resources = event.get("Resources") or []
            if vm and resources and vm not in resources:
                continue
            found.append(
                Notice(
                    kind=kind_action[0],  # type: ignore[arg-type]
                    action=kind_action[1],  # type: ignore[arg-type]
                    deadline=_parse_http_date(event.get("NotBefore", "")),
                    source=self.name,
                    event_id=str(event.get("EventId", "")),
                    detail=str(event.get("Description", "")),
                )
            )
        found.sort(key=lambda n: n.kind != "interruption")  # the most urgent first
        return found[0] if found else None

    def acknowledge(self, notice: Notice) -> None:
        """Approve the event: our state is saved, Azure need not wait for NotBefore."""
        if not notice.event_id:
            return
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        resp = request(
            self.endpoint,
            "POST",
            EVENTS_PATH,
            headers={**self._headers(), "Content-Type": "application/json"},
            body=body,
            timeout=self.timeout,
        )
        if resp.status != 200:
            raise MetadataError(f"Azure refused to start event {notice.event_id}: {resp.status}")


def _parse_http_date(text: str) -> datetime | None:
    """``NotBefore`` is an RFC 1123 date; empty once the event has started."""
    if not text:
        return None
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
