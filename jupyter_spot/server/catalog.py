"""What the store says about sessions: summaries, records, and which sessions were interrupted.

Pure functions over a :class:`~jupyter_spot.store.Store`, shared by the REST
handlers and the ``jupyter spot`` CLI, so both tell the same story.

**Interrupted** (the definition the REST API and docs/server.md use): a session
is interrupted when it has an *interrupted line* (jupyter_spot/store/lines.py):
a line of descent whose newest snapshot holds state that no running kernel has
and nobody restored, discarded or closed. Concretely, a line that:

1. has a snapshot that loads (signed by our key);
2. nobody restored or discarded since its newest snapshot (the session's
   ``lines-…`` record), and whose kernel was not shut down cleanly by the user
   after it (a ``closed`` decision, or for snapshots older than lines, a
   ``closed`` session record);
3. is not owned by a kernel of this session running on this server: one that
   wrote its newest snapshot or restored one of its snapshots (for snapshots
   older than lines, one started after the snapshot). A new kernel that has not
   restored writes a line of its own, so running cells never ends an interruption:
   only Restore or Discard does;
4. is not owned by a kernel alive under another server sharing the store: each
   server running a kernel of the session keeps an entry in the record's
   ``holders`` with a ``heartbeat`` it refreshes, and a kernel counts as live
   elsewhere while that heartbeat is fresh (two of its intervals plus slack),
   that server's process still exists when it is on this host, and no notice
   named the kernel (a machine that was told to go is going). Kernels read the
   same entries (store/holders.py), so they do not offer such a line either.

Of several such lines the newest is the interrupted one, except that a line
started beside another undecided one never hides it (store/lines.py).

The ``reason`` comes from the records: the cause of a kernel the server lost
without the user asking (its exit status, idle culling, or the server stopping; server/losses.py),
else the notice record that named the session's last kernel, else the session record of a kernel that never shut
down cleanly, else "written by a kernel outside this server".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..store import ManifestError, Store, StoreError, UnknownKeyError
from ..store.holders import (
    held_lines,
    holders_elsewhere,
    notice_reason,
    notice_records,
    read_session_record,
)
from ..store.lines import (
    CLOSED,
    DISCARDED,
    Line,
    LineIndex,
    interrupted_line,
    load_decisions,
    parse_time,
    record_decision,
)
from .losses import SERVER_STOPPED, largest_variables

_BAD_COMPONENT = re.compile(r"[\x00-\x1f\x7f\\]")


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
    #: Its earlier processes lost without the user asking (server/losses.py), oldest first.
    losses: list[dict[str, Any]] = field(default_factory=list)


def _owned_here(line: Line, mine: list[LiveKernel]) -> bool:
    """A kernel of the session on this server wrote the line's newest snapshot or restored one of it."""
    if any(k.restored in line.snapshots for k in mine):
        return True
    if line.kernel is not None:
        # Same kernel id, but written before its current process started: the process that died wrote it.
        created = line.newest.created if line.newest else None
        return any(line.kernel == k.kernel_id and (created is None or created >= k.started) for k in mine)
    created = line.newest.created if line.newest else None  # a snapshot from before lines: by time
    return created is not None and any(k.started <= created for k in mine)


def _closed_by_record(line: Line, record: dict[str, Any]) -> bool:
    """A ``closed`` session record after the line's newest snapshot, from the kernel that wrote it."""
    closed_at = parse_time(record.get("closed_at")) if record.get("state") == "closed" else None
    created = line.newest.created if line.newest else None
    if closed_at is None or created is None or closed_at < created:
        return False
    kernel = record.get("kernel_id")
    return line.kernel is None or kernel is None or kernel == line.kernel


def _reason(
    line: Line, record: dict[str, Any], mine: list[LiveKernel], notices: list[dict[str, Any]], session: str
) -> str:
    """Why the line stopped: its kernel's loss (exit status, culling), its notice, an unfinished run,
    an unclean stop, else who wrote it."""
    loss = line_loss(line, record)
    if loss is not None:
        return str(loss.get("text"))
    kernel = line.kernel or record.get("kernel_id")
    if kernel in {k.kernel_id for k in mine}:
        kernel = None  # our own new kernel wrote the record last: it is not the one that stopped
    reason = notice_reason(notices, session, kernel) if kernel else None
    where = record.get("host") or "another machine"
    if reason is None and record.get("state") == "running":
        reason = f"`jupyter spot run` on {where} did not finish; run it again to resume"
    if reason is None and kernel and record.get("kernel_id") == kernel and record.get("state") == "live":
        reason = f"kernel {kernel} on {where} stopped without a clean shutdown"
    if reason is None and kernel and kernel in _recorded_kernels(record):
        reason = f"kernel {kernel} stopped without a clean shutdown"
    return reason or notice_reason(notices, session, None) or "written by a kernel no server here is running"


def line_loss(line: Line, record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's ``lost`` entry for the process that wrote the line: same kernel, lost after its newest snapshot.

    A stopping server records the loss before it shuts its kernels down, and a kernel may still snapshot on its
    way out (its cell interrupted); the kernel id ends with that server, so such a loss is every later line's too.
    """
    created = line.newest.created if line.newest else None
    losses = record.get("lost")
    if not isinstance(losses, list) or line.kernel is None or created is None:
        return None
    for loss in losses:
        at = parse_time(loss.get("at")) if isinstance(loss, dict) else None
        if at is None or loss.get("kernel_id") != line.kernel or not loss.get("text"):
            continue
        if at >= created or loss.get("kind") == SERVER_STOPPED:
            return loss
    return None


def _recorded_kernels(record: dict[str, Any]) -> set[str]:
    holders = record.get("holders")
    if not isinstance(holders, dict):
        return set()
    kernels = {holder.get("kernel_id") for holder in holders.values() if isinstance(holder, dict)}
    return {kernel for kernel in kernels if isinstance(kernel, str)}


def session_lines(
    store: Store,
    session: str,
    live: list[LiveKernel],
    notices: list[dict[str, Any]] | None = None,
    server_id: str | None = None,
    index: LineIndex | None = None,
) -> tuple[dict[str, Line], Line | None, dict[str, Any] | None, dict[str, Any]]:
    """The session's lines, its interrupted line, a kernel live elsewhere, and its session record."""
    lines = (index or LineIndex(store)).lines(session)
    record = read_session_record(store, session)
    mine = [k for k in live if k.session == session]
    owned = {line.id for line in lines.values() if _owned_here(line, mine) or _closed_by_record(line, record)}
    elsewhere = None
    if record.get("holders") and len(owned) < len(lines):
        notices = notice_records(store) if notices is None else notices
        for line_id, holder in held_lines(lines, holders_elsewhere(record, server_id, notices)).items():
            if line_id not in owned:
                owned.add(line_id)
                elsewhere = elsewhere or holder
    interrupted = interrupted_line(lines, load_decisions(store, session), owned)
    return lines, interrupted, elsewhere, record


def describe_session(
    store: Store,
    session: str,
    live: list[LiveKernel],
    notices: list[dict[str, Any]] | None = None,
    server_id: str | None = None,
    index: LineIndex | None = None,
) -> dict[str, Any] | None:
    """The API's Session object, or None when the session has no loadable snapshot.

    ``latest`` is what a restore of "latest" loads: the interrupted line's newest
    snapshot while there is one, else the session's newest. ``server_id`` is the
    asking server's (None for the CLI, which runs no kernels).
    """
    lines, interrupted, elsewhere, record = session_lines(store, session, live, notices, server_id, index)
    if not lines:
        return None
    if interrupted is not None:
        manifest = store.load_manifest(session, interrupted.newest_id)
    else:
        manifest, _problems = store.latest_manifest(session)
        if manifest is None:
            return None
    mine = [k for k in live if k.session == session]
    reason, cause, largest = None, None, []
    if interrupted is not None:
        notices = notice_records(store) if notices is None else notices
        reason = _reason(interrupted, record, mine, notices, session)
        loss = line_loss(interrupted, record)
        cause = loss.get("kind") if loss else None
        if cause == "oom":  # so the user can %spot exclude or free them before restoring into the same memory
            largest = largest_variables(manifest)
    newest_id = max(line.newest_id for line in lines.values())
    newest = manifest if newest_id == manifest["id"] else store.load_manifest(session, newest_id)
    return {
        "id": session,
        "interrupted": interrupted is not None,
        "live_kernel": mine[-1].kernel_id if mine else None,
        "live_elsewhere": elsewhere,
        "reason": reason,
        "cause": cause,
        "largest_variables": largest,
        "latest": snapshot_summary(manifest),
        "line": interrupted.id if interrupted is not None else manifest.get("line") or "legacy",
        "newest": snapshot_summary(newest),
    }


def discard_line(
    store: Store,
    session: str,
    live: list[LiveKernel],
    snapshot: str | None,
    by: str,
    server_id: str | None = None,
    index: LineIndex | None = None,
) -> dict[str, Any] | None:
    """Stop offering the interrupted line (or ``snapshot``'s): None when there is nothing to discard."""
    lines, interrupted, _, _ = session_lines(store, session, live, server_id=server_id, index=index)
    if snapshot is None:
        line = interrupted
    else:
        line = next((each for each in lines.values() if snapshot in each.snapshots), None)
    if line is None:
        return None
    record_decision(store, session, line.id, DISCARDED, line.newest_id, by)
    return {"line": line.id, "snapshot": snapshot_summary(store.load_manifest(session, line.newest_id))}


def close_kernel_lines(store: Store, session: str, kernel_id: str, index: LineIndex | None = None) -> list[str]:
    """The user shut ``kernel_id`` down: the lines whose newest snapshot it wrote are closed, not interrupted."""
    closed = []
    for line in (index or LineIndex(store)).lines(session).values():
        if line.kernel == kernel_id:
            record_decision(store, session, line.id, CLOSED, line.newest_id, f"kernel {kernel_id} shut down")
            closed.append(line.id)
    return closed


def describe_sessions(
    store: Store,
    live: list[LiveKernel],
    only: str | None = None,
    server_id: str | None = None,
    index: LineIndex | None = None,
) -> list[dict[str, Any]]:
    """Every session with a loadable snapshot (or just ``only``), newest activity first."""
    names = [only] if only is not None else store.list_sessions()
    notices = notice_records(store)
    index = index or LineIndex(store)
    described = (describe_session(store, name, live, notices, server_id, index) for name in names)
    sessions = [s for s in described if s is not None]
    sessions.sort(key=lambda s: s["latest"]["created"] or "", reverse=True)
    return sessions


def unverifiable_sessions(store: Store, only: str | None, described: set[str]) -> list[dict[str, Any]]:
    """Sessions with snapshots signed by a key this machine lacks (a fresh machine), each with
    the exact fix. Nothing in them is loaded; they are not offered for restore."""
    found = []
    for session in [only] if only is not None else store.list_sessions():
        if session in described:
            continue
        ids = store.list_snapshots(session)
        if not ids:
            continue
        try:
            store.load_manifest(session, ids[-1])
        except UnknownKeyError as error:
            found.append({
                "id": session,
                "snapshots": len(ids),
                "key_id": error.key_id,
                "fix": error.fix,
                "message": f"This notebook has {len(ids)} snapshot{'' if len(ids) == 1 else 's'} signed with key "
                f"{error.key_id or '(unnamed)'}, which this machine does not have, so none can be restored here. "
                f"To use them: {error.fix}",
            })
        except StoreError:
            continue  # damaged or tampered: latest_manifest's problems already say so
    return found
