"""Which kernels hold a session right now, from its session record: servers and kernels both ask.

Every kernel of a session a server runs has an entry in the session record's
``holders`` (keyed by :func:`holder_key`: server id and kernel id, so two kernels
of one notebook under one server do not hide each other), with the server's id
and a ``heartbeat`` the server refreshes. A
kernel counts as live while that heartbeat is fresh (two of its intervals plus
slack), its server's process still exists when it is on this host, and no notice
named the kernel (a machine that was told to go is going). A line whose newest
snapshot such a kernel wrote is that kernel's, not interrupted: offering it
elsewhere would fork it (docs/server.md, docs/kernel.md).
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import datetime, timezone
from typing import Any

from .base import Store, report_bad_record
from .errors import StoreError
from .lines import Line, parse_time

NOTICE_RECORD_PREFIX = "notice-"
SESSION_RECORD_PREFIX = "session-"
#: A heartbeat older than this many of its writer's intervals (plus the slack, for
#: clocks and slow stores) is from a server that is gone.
HEARTBEAT_MISSES = 2
HEARTBEAT_SLACK_SECONDS = 10.0

#: The fields readers of a session record use, with their types (any may be absent or null).
SESSION_RECORD_FIELDS: dict[str, type] = {
    "session": str, "state": str, "kernel_id": str, "host": str, "server": str, "started": str,
    "closed_at": str, "renamed_to": str, "kernel": dict, "holders": dict, "lost": list,
}
NOTICE_RECORD_FIELDS: dict[str, type] = {
    "at": str, "host": str, "server": str, "notice": dict, "kernels": list, "jobs": list,
}


def holder_key(server_id: str, kernel_id: str) -> str:
    """The key of one kernel's entry in a session record's ``holders``."""
    return f"{server_id}/{kernel_id}"


def holder_server(key: str, holder: dict[str, Any]) -> str:
    """The id of the server that wrote a ``holders`` entry (an older server keyed its one entry by it)."""
    server_id = holder.get("server_id")
    return server_id if isinstance(server_id, str) else key


def session_record_name(session: str) -> str:
    """Record names are short and path-free; a session name may be neither."""
    return SESSION_RECORD_PREFIX + hashlib.sha256(session.encode()).hexdigest()[:40]


def well_shaped(
    store: Store, name: str, record: dict[str, Any] | None, fields: dict[str, type]
) -> dict[str, Any] | None:
    """``record`` if every field it has is of the type its readers expect; else None, with one warning."""
    if record is None:
        return None
    for key, kind in fields.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            report_bad_record(store.url, name, f"its {key!r} is a {type(value).__name__}, not a {kind.__name__}")
            return None
    return record


def read_session_record(store: Store, session: str) -> dict[str, Any]:
    """The session's record, or {} when there is none or it is malformed (a warning says which)."""
    name = session_record_name(session)
    return well_shaped(store, name, store.get_record(name), SESSION_RECORD_FIELDS) or {}


def notice_records(store: Store) -> list[dict[str, Any]]:
    """Every notice record, newest first."""
    records = []
    for name in reversed(store.list_records()):
        if name.startswith(NOTICE_RECORD_PREFIX):
            try:
                record = well_shaped(store, name, store.get_record(name), NOTICE_RECORD_FIELDS)
            except StoreError:
                continue
            if record and not all(isinstance(entry, dict) for entry in record.get("kernels") or []):
                report_bad_record(store.url, name, "its 'kernels' are not all objects")
                continue
            if record:
                records.append(record)
    return records


def notice_reason(notices: list[dict[str, Any]], session: str, kernel_id: str | None) -> str | None:
    """The newest notice that named the session's kernel (any kernel of it when None), as a sentence."""
    for record in notices:
        for entry in record.get("kernels", []):
            if entry.get("session") == session and (kernel_id is None or entry.get("kernel_id") == kernel_id):
                notice = record.get("notice") or {}
                return (
                    f"{notice.get('source', '?')} {notice.get('kind', 'interruption')} notice "
                    f"({notice.get('action', '?')}) at {record.get('at', '?')}; "
                    f"flush {entry.get('status', '?')}"
                )
    return None


def process_exists(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def fresh_holders(record: dict[str, Any], now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The record's ``holders`` (:func:`holder_key` → a live kernel) whose heartbeat is still fresh."""
    holders = record.get("holders")
    if not isinstance(holders, dict):
        return {}
    moment = now or datetime.now(timezone.utc)
    fresh = {}
    for key, holder in holders.items():
        beat = parse_time(holder.get("heartbeat")) if isinstance(holder, dict) else None
        interval = holder.get("heartbeat_interval") if isinstance(holder, dict) else None
        if beat is None or not isinstance(interval, (int, float)) or interval <= 0:
            continue
        if (moment - beat).total_seconds() <= HEARTBEAT_MISSES * interval + HEARTBEAT_SLACK_SECONDS:
            fresh[key] = holder
    return fresh


def holders_elsewhere(
    record: dict[str, Any],
    server_id: str | None,
    notices: list[dict[str, Any]],
    now: datetime | None = None,
    *,
    kernel_id: str | None = None,
) -> list[dict[str, Any]]:
    """Every kernel of the session still running, from its session record, except the asker's own.

    A server asks with its ``server_id`` (its own kernels it knows better), a
    kernel with its ``kernel_id``: another kernel of the session under the same
    server is live all the same. Every kernel has its own entry, so neither two
    servers on one notebook nor two kernels of it under one server hide each other.
    """
    found = []
    for key, holder in sorted(fresh_holders(record, now).items()):
        if holder_server(key, holder) == server_id or (kernel_id and holder.get("kernel_id") == kernel_id):
            continue
        if holder.get("host") == socket.gethostname() and not process_exists(holder.get("server_pid")):
            continue
        holder_kernel = holder.get("kernel_id")
        if holder_kernel and notice_reason(notices, str(record.get("session")), holder_kernel):
            continue  # that machine was told to go
        found.append({"host": holder.get("host"), "server": holder.get("server"), "kernel_id": holder_kernel,
                      "heartbeat": holder.get("heartbeat")})
    return found


def held_lines(lines: dict[str, Line], holders: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The lines a live holder is writing (its kernel wrote their newest snapshot), by line id.

    A line from before lines named no kernel: any live holder holds it.
    """
    if not holders:
        return {}
    by_kernel = {holder["kernel_id"]: holder for holder in holders}
    held = {}
    for line in lines.values():
        holder = by_kernel.get(line.kernel) if line.kernel else holders[0]
        if holder is not None:
            held[line.id] = holder
    return held

