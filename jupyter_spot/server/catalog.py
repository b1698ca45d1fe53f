"""What the store says about sessions: summaries, records, and which sessions were interrupted.

Pure functions over a :class:`~jupyter_spot.store.Store`, shared by the REST
handlers and the ``jupyter spot`` CLI, so both tell the same story.

**Interrupted** (the definition the REST API and docs/server.md use): a session
is interrupted when its latest snapshot holds state that no running kernel has
and nobody chose to throw away. Concretely, all of:

1. it has a snapshot that loads (signed by our key);
2. that snapshot is not already loaded into, nor newer than the start of, a
   kernel of this session that is running on this server (a kernel started
   after the snapshot was written did not write it: a fresh server's kernel for
   the same notebook is still "interrupted" until it restores or writes anew);
3. the session was not closed cleanly after that snapshot — a user shutting
   the kernel down (kernel or session DELETE) writes a ``closed`` session record;
   a server stopping, a notice, SIGKILL or a lost machine do not;
4. its kernel is not alive under another server sharing the store: each server
   running a kernel of the session keeps an entry in the record's ``holders``
   with a ``heartbeat`` it refreshes, and the session counts as live elsewhere
   while another server's heartbeat is fresh (two of its intervals plus slack),
   that server's process still exists when it is on this host, and no notice
   named its kernel (a machine that was told to go is going).

The ``reason`` comes from the records: the notice record that named the
session's last kernel, else the session record of a kernel that never shut
down cleanly, else "written by a kernel outside this server".
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..store import ManifestError, Store, StoreError
from ..store.base import report_bad_record

NOTICE_RECORD_PREFIX = "notice-"
SESSION_RECORD_PREFIX = "session-"
_BAD_COMPONENT = re.compile(r"[\x00-\x1f\x7f\\]")
#: A heartbeat older than this many of its writer's intervals (plus the slack, for
#: clocks and slow stores) is from a server that is gone.
HEARTBEAT_MISSES = 2
HEARTBEAT_SLACK_SECONDS = 10.0


class BadId(ValueError):
    """A session or snapshot id that cannot name anything in a store (HTTP 400)."""


def check_session_name(session: str) -> str:
    """Refuse names that look like path tricks, even though the store encodes them safely.

    Notebook paths relative to the server root, kernel ids and ``pid-N`` pass.
    """
    if not isinstance(session, str) or not session or len(session) > 1024:
        raise BadId(f"not a session id: {session!r}")
    if _BAD_COMPONENT.search(session) or any(part in (".", "..") for part in session.split("/")):
        raise BadId(f"not a session id: {session!r}")
    return session


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isoformat(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """An ISO time from a manifest or record as an aware UTC datetime (None if absent/bad)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def skipped_list(skipped: Any) -> list[dict[str, Any]]:
    """The manifest's ``skipped`` ({name: {type, reason, cell}}) as the API's list."""
    if isinstance(skipped, dict):
        items = [{"name": name, **(info if isinstance(info, dict) else {})} for name, info in skipped.items()]
    elif isinstance(skipped, list):
        items = [dict(item) for item in skipped if isinstance(item, dict)]
    else:
        items = []
    return [
        {"name": str(i.get("name", "")), "type": i.get("type"), "reason": i.get("reason"), "cell": i.get("cell")}
        for i in items
    ]


def snapshot_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as the API's Snapshot object."""
    variables = manifest.get("variables")
    count = manifest.get("variable_count")
    if count is None:
        count = len(variables) if isinstance(variables, dict) else 0
    created = parse_time(manifest.get("created"))
    return {
        "id": manifest["id"],
        "session": manifest["session"],
        "created": isoformat(created) if created else None,
        "kind": manifest.get("kind", "auto"),
        "during_cell": manifest.get("during_cell"),
        "execution_count": int(manifest.get("execution_count") or 0),
        "size": int(manifest.get("size") or 0),
        "variable_count": int(count),
        "skipped": skipped_list(manifest.get("skipped")),
    }


def session_record_name(session: str) -> str:
    """Record names are short and path-free; a session name may be neither."""
    return SESSION_RECORD_PREFIX + hashlib.sha256(session.encode()).hexdigest()[:40]


#: The fields readers of a session record use, with their types (any may be absent or null).
SESSION_RECORD_FIELDS: dict[str, type] = {
    "session": str, "state": str, "kernel_id": str, "host": str, "server": str, "started": str,
    "closed_at": str, "renamed_to": str, "kernel": dict, "holders": dict,
}
NOTICE_RECORD_FIELDS: dict[str, type] = {
    "at": str, "host": str, "server": str, "notice": dict, "kernels": list, "jobs": list,
}


def well_shaped(
    store: Store, name: str, record: dict[str, Any] | None, fields: dict[str, type]
) -> dict[str, Any] | None:
    """``record`` if every field it has is of the type its readers expect; else None, with one warning."""
    if record is None:
        return None
    for field, kind in fields.items():
        value = record.get(field)
        if value is not None and not isinstance(value, kind):
            report_bad_record(store.url, name, f"its {field!r} is a {type(value).__name__}, not a {kind.__name__}")
            return None
    return record


def read_session_record(store: Store, session: str) -> dict[str, Any]:
    """The session's record, or {} when there is none or it is malformed (a warning says which)."""
    name = session_record_name(session)
    return well_shaped(store, name, store.get_record(name), SESSION_RECORD_FIELDS) or {}


def renamed_session(session: str, old: str, new: str) -> str | None:
    """The session's name once ``old`` (its notebook, or a folder holding it) is renamed to ``new``."""
    if session == old:
        return new
    if session.startswith(old + "/"):
        return new + session[len(old):]
    return None


def list_snapshot_summaries(store: Store, session: str) -> list[dict[str, Any]]:
    """The session's snapshots that load, newest first (bad ones are left out, not deleted)."""
    summaries = []
    for snapshot_id in reversed(store.list_snapshots(session)):
        try:
            summaries.append(snapshot_summary(store.load_manifest(session, snapshot_id)))
        except ManifestError:
            continue
    return summaries


@dataclass
class LiveKernel:
    """A kernel running on this server and the session it snapshots into."""

    kernel_id: str
    session: str
    started: datetime
    cwd: str | None = None
    restored: str | None = None  # snapshot id loaded into it through the server


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


def _notice_reason(notices: list[dict[str, Any]], session: str, kernel_id: str | None) -> str | None:
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


def _process_exists(pid: Any) -> bool:
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
    """The record's ``holders`` (server id → its live kernel) whose heartbeat is still fresh."""
    holders = record.get("holders")
    if not isinstance(holders, dict):
        return {}
    moment = now or utcnow()
    fresh = {}
    for server_id, holder in holders.items():
        beat = parse_time(holder.get("heartbeat")) if isinstance(holder, dict) else None
        interval = holder.get("heartbeat_interval") if isinstance(holder, dict) else None
        if beat is None or not isinstance(interval, (int, float)) or interval <= 0:
            continue
        if (moment - beat).total_seconds() <= HEARTBEAT_MISSES * interval + HEARTBEAT_SLACK_SECONDS:
            fresh[server_id] = holder
    return fresh


def live_elsewhere(
    record: dict[str, Any], server_id: str | None, notices: list[dict[str, Any]], now: datetime | None = None
) -> dict[str, Any] | None:
    """Where the session's kernel still runs under another server, from its session record; None if not.

    Every server running a kernel of the session keeps its own entry in the
    record's ``holders``, so two servers on one notebook do not hide each other.
    """
    for holder_id, holder in sorted(fresh_holders(record, now).items()):
        if holder_id == server_id:
            continue
        if holder.get("host") == socket.gethostname() and not _process_exists(holder.get("server_pid")):
            continue
        kernel_id = holder.get("kernel_id")
        if kernel_id and _notice_reason(notices, str(record.get("session")), kernel_id):
            continue  # that machine was told to go
        return {"host": holder.get("host"), "server": holder.get("server"), "kernel_id": kernel_id,
                "heartbeat": holder.get("heartbeat")}
    return None


def describe_session(
    store: Store,
    session: str,
    live: list[LiveKernel],
    notices: list[dict[str, Any]] | None = None,
    server_id: str | None = None,
) -> dict[str, Any] | None:
    """The API's Session object, or None when the session has no loadable snapshot.

    ``server_id`` is the asking server's (None for the CLI, which runs no kernels).
    """
    manifest, _problems = store.latest_manifest(session)
    if manifest is None:
        return None
    latest = snapshot_summary(manifest)
    created = parse_time(manifest.get("created")) or utcnow()
    mine = [k for k in live if k.session == session]
    live_kernel = mine[-1].kernel_id if mine else None
    record = read_session_record(store, session)

    caught_up = any(k.restored is not None or k.started <= created for k in mine)
    closed_at = parse_time(record.get("closed_at")) if record.get("state") == "closed" else None
    closed = closed_at is not None and closed_at >= created
    elsewhere = None
    if not caught_up and record.get("holders"):
        notices = notice_records(store) if notices is None else notices
        elsewhere = live_elsewhere(record, server_id, notices)
    interrupted = not caught_up and not closed and elsewhere is None

    reason = None
    if interrupted:
        notices = notice_records(store) if notices is None else notices
        last_kernel = record.get("kernel_id")
        if last_kernel in {k.kernel_id for k in mine}:
            last_kernel = None  # our own new kernel wrote the record last: it is not the one that stopped
        reason = _notice_reason(notices, session, last_kernel) if last_kernel else None
        where = record.get("host") or "another machine"
        if reason is None and record.get("state") == "running":
            reason = f"`jupyter spot run` on {where} did not finish; run it again to resume"
        if reason is None and record.get("state") == "live" and last_kernel:
            reason = f"kernel {last_kernel} on {where} stopped without a clean shutdown"
        if reason is None:
            reason = _notice_reason(notices, session, None) or "written by a kernel no server here is running"
    return {
        "id": session,
        "interrupted": interrupted,
        "live_kernel": live_kernel,
        "live_elsewhere": elsewhere,
        "reason": reason,
        "latest": latest,
    }


def describe_sessions(
    store: Store, live: list[LiveKernel], only: str | None = None, server_id: str | None = None
) -> list[dict[str, Any]]:
    """Every session with a loadable snapshot (or just ``only``), newest activity first."""
    names = [only] if only is not None else store.list_sessions()
    notices = notice_records(store)
    described = (describe_session(store, name, live, notices, server_id) for name in names)
    sessions = [s for s in described if s is not None]
    sessions.sort(key=lambda s: s["latest"]["created"] or "", reverse=True)
    return sessions
