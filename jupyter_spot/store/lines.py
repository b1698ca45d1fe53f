"""Lines of descent: which snapshots of a session continue which, and what nobody decided about.

Every manifest names its ``line`` and ``parent``. A kernel that restored keeps
writing the line it restored from; a kernel that did not starts a line of its own
at its first snapshot, and names in ``beside`` the undecided line it saw then (the
one it could have restored). So a new kernel's snapshots — a cell run before
Restore, a notice's flush — never hide the state of the kernel that was lost.

A line is *undecided* while nobody restored, discarded or closed it at (or after)
its newest snapshot: a kernel that continues a restored line makes it undecided
again with its next snapshot, so losing that kernel too is noticed.

Decisions live in one unsigned record per session (``lines-<sha256(session)[:40]>``).
Unsigned is enough: a decision only changes which snapshot is *offered* (and which
GC spares); what is loaded is always a signed manifest and the blobs it names, so
a forged record can never make a kernel unpickle bytes we did not write. Two
writers racing on the record can lose a decision; the line is then offered
again, never lost.

Manifests written before lines existed have no ``line``: each session's are one
line, :data:`LEGACY_LINE`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .base import Store
from .errors import ManifestError, StoreError

LEGACY_LINE = "legacy"
LINES_RECORD_PREFIX = "lines-"
#: What a decision about a line can be.
RESTORED, DISCARDED, CLOSED = "restored", "discarded", "closed"
DECISIONS = (RESTORED, DISCARDED, CLOSED)
#: Default of ``keep_interrupted_days``: how long GC spares an undecided line's newest snapshot.
KEEP_INTERRUPTED_DAYS = 14.0


@dataclass(frozen=True)
class SnapshotLine:
    """What lines need to know of one (verified) manifest."""

    id: str
    line: str
    kernel: str | None
    beside: str | None
    created: datetime | None

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> SnapshotLine:
        line = manifest.get("line")
        beside = manifest.get("beside")
        kernel = manifest.get("kernel")
        return cls(
            id=str(manifest["id"]),
            line=line if isinstance(line, str) and line else LEGACY_LINE,
            kernel=kernel if isinstance(kernel, str) and kernel else None,
            beside=beside if isinstance(beside, str) and beside else None,
            created=parse_time(manifest.get("created")),
        )


@dataclass
class Line:
    """One line of a session: its snapshots (oldest first) and the newest one's facts."""

    id: str
    snapshots: list[str] = field(default_factory=list)
    newest: SnapshotLine | None = None

    @property
    def newest_id(self) -> str:
        assert self.newest is not None
        return self.newest.id

    @property
    def beside(self) -> str | None:
        """The undecided line its first kernel saw and did not restore (set on every snapshot of the line)."""
        return self.newest.beside if self.newest else None

    @property
    def kernel(self) -> str | None:
        """The kernel that wrote its newest snapshot."""
        return self.newest.kernel if self.newest else None


@dataclass(frozen=True)
class Decision:
    decision: str
    snapshot: str  # the line's newest snapshot when it was decided
    at: str = ""
    by: str = ""


def parse_time(value: Any) -> datetime | None:
    """An ISO time from a manifest or record as an aware UTC datetime (None if absent/bad)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def lines_record_name(session: str) -> str:
    return LINES_RECORD_PREFIX + hashlib.sha256(session.encode()).hexdigest()[:40]


class LineIndex:
    """Each snapshot's line, read once: manifests never change, so a process caches what it read.

    Only manifests that verify count; one that does not is left out (restore
    reports it when it tries it).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[tuple[str, str], SnapshotLine] = {}
        self._lock = threading.Lock()

    def remember(self, session: str, manifest: dict[str, Any]) -> None:
        """A manifest this process wrote or loaded anyway: no need to read it again."""
        with self._lock:
            self._known[(session, str(manifest["id"]))] = SnapshotLine.of(manifest)

    def snapshot_line(self, session: str, snapshot_id: str) -> SnapshotLine | None:
        with self._lock:
            known = self._known.get((session, snapshot_id))
        if known is not None:
            return known
        try:
            manifest = self.store.load_manifest(session, snapshot_id)
        except (ManifestError, StoreError):
            return None
        self.remember(session, manifest)
        return SnapshotLine.of(manifest)

    def lines(self, session: str, ids: list[str] | None = None) -> dict[str, Line]:
        """The session's lines (``ids``: its listing, if the caller has it), each with its snapshots."""
        ids = self.store.list_snapshots(session) if ids is None else ids
        lines: dict[str, Line] = {}
        for snapshot_id in ids:
            info = self.snapshot_line(session, snapshot_id)
            if info is None:
                continue
            line = lines.setdefault(info.line, Line(info.line))
            line.snapshots.append(snapshot_id)
            line.newest = info  # ids are listed oldest first
        with self._lock:  # forget what was deleted
            present = set(ids)
            for key in [k for k in self._known if k[0] == session and k[1] not in present]:
                del self._known[key]
        return lines


def load_decisions(store: Store, session: str) -> dict[str, Decision]:
    """The session's decisions by line; a malformed record or entry counts as no decision."""
    try:
        record = store.get_record(lines_record_name(session))
    except StoreError:
        return {}
    if not isinstance(record, dict) or record.get("session") != session or not isinstance(record.get("lines"), dict):
        return {}
    decisions = {}
    for line, entry in record["lines"].items():
        if (
            isinstance(line, str)
            and isinstance(entry, dict)
            and entry.get("decision") in DECISIONS
            and isinstance(entry.get("snapshot"), str)
        ):
            decisions[line] = Decision(entry["decision"], entry["snapshot"], str(entry.get("at", "")),
                                       str(entry.get("by", "")))
    return decisions


def record_decision(store: Store, session: str, line: str, decision: str, snapshot: str, by: str) -> None:
    """Remember that ``line`` was restored, discarded or closed as of its snapshot ``snapshot``."""
    if decision not in DECISIONS:
        raise ValueError(f"not a decision: {decision!r}")
    name = lines_record_name(session)
    try:
        record = store.get_record(name)
    except StoreError:
        record = None
    entries = record.get("lines") if isinstance(record, dict) and record.get("session") == session else None
    entries = dict(entries) if isinstance(entries, dict) else {}
    previous = entries.get(line)
    if isinstance(previous, dict) and isinstance(previous.get("snapshot"), str) and previous["snapshot"] > snapshot:
        snapshot = previous["snapshot"]  # a decision never moves back in a line
    entries[line] = {"decision": decision, "snapshot": snapshot,
                     "at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "by": by}
    store.put_record(name, {"session": session, "lines": entries})


def undecided(line: Line, decisions: dict[str, Decision]) -> bool:
    """Nobody restored, discarded or closed the line since its newest snapshot."""
    decision = decisions.get(line.id)
    return line.newest is not None and (decision is None or line.newest_id > decision.snapshot)


def interrupted_line(lines: dict[str, Line], decisions: dict[str, Decision], owned: set[str]) -> Line | None:
    """The line ``latest`` restores: the newest undecided line nobody owns, but never one
    started beside another undecided line — a kernel that saw state it did not restore
    does not hide it, whatever it wrote since."""
    candidates = {
        line.id: line for line in lines.values() if line.id not in owned and undecided(line, decisions)
    }
    if not candidates:
        return None
    pick = max(candidates.values(), key=lambda line: line.newest_id)
    seen = {pick.id}
    while pick.beside in candidates and pick.beside not in seen:
        pick = candidates[pick.beside]
        seen.add(pick.id)
    return pick


def protected_snapshots(
    lines: dict[str, Line],
    decisions: dict[str, Decision],
    keep_interrupted_days: float,
    now: datetime | None = None,
) -> set[str]:
    """The newest snapshot of every line nobody restored or discarded, younger than the limit.

    A line closed cleanly counts as undecided here: GC errs on the side of keeping.
    """
    moment = now or datetime.now(timezone.utc)
    oldest = moment - timedelta(days=keep_interrupted_days)
    kept = set()
    for line in lines.values():
        decision = decisions.get(line.id)
        decided = decision is not None and decision.decision != CLOSED and line.newest_id <= decision.snapshot
        created = line.newest.created if line.newest else None
        if not decided and (created is None or created >= oldest):
            kept.add(line.newest_id)
    return kept


def close_line_of(store: Store, session: str, snapshot_id: str, by: str) -> str | None:
    """A run that finished cleanly closes the line of its last snapshot; the line's id (None if unreadable)."""
    info = LineIndex(store).snapshot_line(session, snapshot_id)
    if info is None:
        return None
    line = LineIndex(store).lines(session).get(info.line)
    newest = line.newest_id if line is not None else snapshot_id
    record_decision(store, session, info.line, CLOSED, max(newest, snapshot_id), by)
    return info.line
