"""GCE metadata: preemption (``instance/preempted``) and host maintenance (``instance/maintenance-event``).

Each key has its own hanging GET (``wait_for_change`` with that key's
``last_etag``), and the two wait at the same time, so a change to either
arrives the moment it is set, with no polling interval at all. The first GET
of each key sends ``last_etag=0``, which matches no real ETag: the metadata
server answers at once with the current value, so a notice already standing
when watching starts is not missed.

* ``preempted`` turns TRUE about 30 s before a Spot VM is stopped.
* ``maintenance-event`` leaves ``NONE`` 60 s before host maintenance (GPU VMs:
  an hour before; we count on the shorter time). ``TERMINATE_ON_HOST_MAINTENANCE``
  stops the VM and its memory is lost: a maintenance notice, flushed like a
  preemption. ``MIGRATE_ON_HOST_MAINTENANCE`` is a live migration and memory
  survives it: no notice, as for Azure's Freeze, only one log line. GCE skips
  the 60 s warning for a VM that has not asked for this key since its last
  maintenance, so watching it also earns the warning. A metadata server
  without the key (404) is watched for preemption alone.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from .fetch import EndpointTimeout, Response, request
from .model import Notice, utcnow
from .source import NoticeSource

log = logging.getLogger("jupyter_spot.notice")

HOST_ENV = "GCE_METADATA_HOST"
DEFAULT_HOST = "metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
LEAD_TIME = 30.0  # seconds between preempted=TRUE and the ACPI soft-off
MAINTENANCE_LEAD_TIME = 60.0  # seconds between maintenance-event leaving NONE and the maintenance
NO_MAINTENANCE = "NONE"
TERMINATE_ON_HOST_MAINTENANCE = "TERMINATE_ON_HOST_MAINTENANCE"
MIGRATE_ON_HOST_MAINTENANCE = "MIGRATE_ON_HOST_MAINTENANCE"
FIRST_ETAG = "0"  # matches no ETag the server hands out: the first wait answers at once


class MetadataError(OSError):
    """The metadata server answered with something other than a value we know."""


@dataclass
class _Key:
    """One watched metadata key: what it said last, since when, and whether a GET for it is out."""

    path: str
    watched: bool = True
    etag: str = FIRST_ETAG
    value: str = ""
    changes: int = 0  # how often the value changed: tells one maintenance event from the next
    changed_at: datetime | None = None
    waiting: bool = False


class GCPSource(NoticeSource):
    """Hanging GETs on ``instance/preempted`` and ``instance/maintenance-event``; ``poll`` waits up to ``wait`` seconds."""

    name = "gcp"
    interval = 0.0

    def __init__(
        self,
        host: str | None = None,
        wait: float = 30.0,
        timeout: float = 1.0,
        maintenance: bool = True,
    ) -> None:
        self.endpoint = "http://" + (host or os.environ.get(HOST_ENV) or DEFAULT_HOST)
        self.wait = wait
        self.timeout = timeout
        self._preempted = _Key(PREEMPTED_PATH)
        self._maintenance = _Key(MAINTENANCE_PATH, watched=maintenance)
        self._answers: queue.SimpleQueue[tuple[_Key, Response | Exception]] = queue.SimpleQueue()

    def poll(self) -> Notice | None:
        """Wait until either key answers (a change, or ``wait`` seconds without one); the most urgent notice."""
        for key in (self._preempted, self._maintenance):
            if key.watched and not key.waiting:
                key.waiting = True
                name = "jupyter-spot-gcp-" + key.path.rsplit("/", 1)[1]
                threading.Thread(target=self._get, args=(key,), name=name, daemon=True).start()
        patience = self.wait + 2 * self.timeout
        try:
            answers = [self._answers.get(timeout=patience)]
        except queue.Empty:
            raise EndpointTimeout(f"GCE metadata at {self.endpoint}: no answer in {patience:g} s") from None
        while not self._answers.empty():
            answers.append(self._answers.get_nowait())
        notices: list[Notice] = []
        errors: list[Exception] = []
        for key, answer in answers:
            key.waiting = False
            try:
                notice = self._read(key, answer)
            except Exception as e:  # reported below, unless the other key has a notice
                errors.append(e)
            else:
                if notice is not None:
                    notices.append(notice)
        if notices:
            return min(notices, key=lambda n: n.kind != "interruption")
        if errors:
            raise errors[0]
        return None

    def _get(self, key: _Key) -> None:
        """Thread: one hanging GET for ``key``; the answer, or what went wrong, goes to ``poll``."""
        path = f"{key.path}?wait_for_change=true&timeout_sec={max(1, int(self.wait))}"
        if key.etag:
            path += f"&last_etag={key.etag}"
        answer: Response | Exception
        try:
            answer = request(
                self.endpoint,
                "GET",
                path,
                headers={"Metadata-Flavor": "Google"},
                timeout=self.wait + self.timeout,
            )
        except Exception as e:  # poll raises it on the watcher's thread
            answer = e
        self._answers.put((key, answer))

    def _read(self, key: _Key, answer: Response | Exception) -> Notice | None:
        if isinstance(answer, Exception):
            raise answer
        if key is self._maintenance and answer.status == 404:
            key.watched = False
            log.info("jupyter-spot: GCE metadata at %s has no %s; watching preemption only", self.endpoint, key.path)
            return None
        if answer.status != 200:
            raise MetadataError(f"GCE metadata {key.path} answered {answer.status}")
        # Without an ETag, wait for a change from now rather than asking again at once.
        key.etag = answer.headers.get("etag", "")
        value = answer.text().strip().upper()
        changed = value != key.value
        if changed:
            key.value, key.changes, key.changed_at = value, key.changes + 1, utcnow()
        if key is self._preempted:
            return self._preemption(key)
        return self._host_maintenance(key, changed)

    def _preemption(self, key: _Key) -> Notice | None:
        if key.value == "FALSE":
            return None
        if key.value != "TRUE":
            raise MetadataError(f"GCE metadata {key.path} answered {key.value[:40]!r}")
        return Notice(
            kind="interruption",
            action="preempt",
            deadline=_after(key, LEAD_TIME),
            source=self.name,
            event_id="preempted",
        )

    def _host_maintenance(self, key: _Key, changed: bool) -> Notice | None:
        """TERMINATE is a notice; MIGRATE and values we do not know are logged once per change, not per wait."""
        if key.value == TERMINATE_ON_HOST_MAINTENANCE:
            return Notice(
                kind="maintenance",
                action="stop",
                deadline=_after(key, MAINTENANCE_LEAD_TIME),
                source=self.name,
                event_id=f"host-maintenance-{key.changes}",
                detail=key.value,
            )
        if changed and key.value == MIGRATE_ON_HOST_MAINTENANCE:
            log.info("jupyter-spot: GCE will live-migrate this VM within a minute; memory survives, nothing to flush")
        elif changed and key.value != NO_MAINTENANCE:
            log.warning(
                "jupyter-spot: GCE metadata %s says %r, which is not a known event; no notice", key.path, key.value[:60]
            )
        return None


def _after(key: _Key, seconds: float) -> datetime:
    """The deadline counted from when the key first showed its value, not from this (repeated) answer."""
    return (key.changed_at or utcnow()) + timedelta(seconds=seconds)
