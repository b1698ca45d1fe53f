"""This kernel's line of descent, and what it says about state it did not restore.

A kernel owns no line until it restores one (it then continues that line) or
takes its first snapshot (it then starts a line of its own, ``beside`` the
undecided line it could have restored). ``latest`` means the interrupted line's
newest snapshot until someone restores or discards that line (see
jupyter_spot/store/lines.py and docs/kernel.md).

A line another kernel is still writing (its server's fresh heartbeat in the
session record, jupyter_spot/store/holders.py) is live, not interrupted: it is
never offered, ``latest`` refuses to take it over, and restoring one of its
snapshots by id copies that state here as a line of this kernel's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..store import ManifestError, Store, StoreError
from ..store.holders import fresh_holders, held_lines, holders_elsewhere, notice_records, read_session_record
from ..store.lines import (
    DISCARDED,
    RESTORED,
    Line,
    LineIndex,
    SnapshotLine,
    interrupted_line,
    load_decisions,
    record_decision,
    undecided,
)
from ..units import human_bytes

#: Variables named in a notice or report before "…".
NAMES_SHOWN = 12


@dataclass
class LatestChoice:
    """Which snapshots ``restore latest`` tries, in order, and what to say about the choice."""

    candidates: list[str]
    notes: list[str] = field(default_factory=list)
    #: The notes hold only if one of these loads (else the fallbacks tell the story).
    line_snapshots: set[str] = field(default_factory=set)
    #: Other interrupted lines by id, each with the note naming it: said whatever loads,
    #: unless it is that line's own snapshot, so no lost state is passed over in silence.
    other_lines: dict[str, str] = field(default_factory=dict)
    #: Why ``latest`` loads nothing: its pick is a line another kernel is still writing.
    refusal: str | None = None


def describe_snapshot(manifest: dict[str, Any]) -> str:
    """``20261129T… (taken 2026-11-29 17:40:01 UTC, 2 variables, 1.2 KB: data, x)``"""
    created = manifest.get("created")
    try:
        when = datetime.fromisoformat(str(created)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        when = "at an unknown time"
    names = sorted(manifest.get("variables") or {})
    shown = ", ".join(names[:NAMES_SHOWN]) + (", …" if len(names) > NAMES_SHOWN else "")
    count = len(names)
    return (
        f"{manifest['id']} (taken {when}, {count} variable{'s' if count != 1 else ''}, "
        f"{human_bytes(int(manifest.get('size') or 0))}{': ' + shown if shown else ''})"
    )


def describe_holder(holder: dict[str, Any]) -> str:
    """``kernel <id> on <host> (server <url>)``"""
    return (f"kernel {holder.get('kernel_id') or '?'} on {holder.get('host') or 'another machine'} "
            f"(server {holder.get('server') or '?'})")


class KernelLines:
    """The engine's line bookkeeping: own line, the first-cell notice, ``latest``, discard."""

    def __init__(self, store: Store, kernel_id: str) -> None:
        self.store = store
        self.index = LineIndex(store)
        self.kernel_id = kernel_id
        self.line: str | None = None
        self.beside: str | None = None
        self.announced = False
        #: The session and the interrupted line the first cell's announcement saw. A notice's flush
        #: then starts this kernel's line beside it without asking a store that may be slow (S3).
        self._seen: tuple[str, Line | None] | None = None

    @property
    def by(self) -> str:
        return f"kernel {self.kernel_id}"

    def _owned(self) -> set[str]:
        return {self.line} if self.line else set()

    def interrupted(self, session: str) -> tuple[Line | None, dict[str, Line]]:
        """The session's interrupted line as this kernel sees it (its own line is never one)."""
        line, lines, _ = self.interrupted_and_live(session)
        return line, lines

    def interrupted_and_live(
        self, session: str
    ) -> tuple[Line | None, dict[str, Line], dict[str, dict[str, Any]]]:
        """The interrupted line, every line, and the lines other live kernels are writing (by id, their holder)."""
        lines = self.index.lines(session)
        live = self.live_lines(session, lines)
        owned = self._owned() | set(live)
        return interrupted_line(lines, load_decisions(self.store, session), owned), lines, live

    def live_lines(self, session: str, lines: dict[str, Line]) -> dict[str, dict[str, Any]]:
        """The lines another kernel of the session is still writing, on another server or this one."""
        record = read_session_record(self.store, session) if lines else {}
        if all(holder.get("kernel_id") == self.kernel_id for holder in fresh_holders(record).values()):
            return {}  # none but this kernel's own entry: no need to read the notices
        holders = holders_elsewhere(record, None, notice_records(self.store), kernel_id=self.kernel_id or None)
        return {line_id: holder for line_id, holder in held_lines(lines, holders).items() if line_id != self.line}

    # -- snapshots -------------------------------------------------------------
    def manifest_fields(self, session: str, snapshot_id: str) -> dict[str, Any]:
        """``line``, ``beside`` and ``kernel`` of the snapshot being taken; the first one starts a line."""
        if self.line is None:
            seen = self._seen[1] if self._seen is not None and self._seen[0] == session else None
            if self._seen is None or self._seen[0] != session:
                try:
                    seen, _ = self.interrupted(session)
                except (StoreError, OSError):
                    seen = None  # the commit will fail and say why; the line starts all the same
            self.line, self.beside = snapshot_id, seen.id if seen else None
            self.announced = True  # from now on `%spot list` and `latest` say what there is
        return {"line": self.line, "beside": self.beside, "kernel": self.kernel_id or None}

    # -- what a new kernel says once ---------------------------------------------
    def announcement(self, session: str) -> str | None:
        """Once, before this kernel owns a line: the interrupted line it could restore, if any.

        Raises what the store raises; the engine warns (once) instead of printing this.
        """
        if self.announced:
            return None
        self.announced = True
        line, lines, live = self.interrupted_and_live(session)
        self._seen = session, line
        said = []
        if line is not None:
            manifest = self.store.load_manifest(session, line.newest_id)
            said.append(
                f"jupyter-spot: session {session!r} has state this kernel did not restore: snapshot "
                f"{describe_snapshot(manifest)}.\n"
                f"  %spot restore    loads it into this kernel (its line then continues here)\n"
                f"  %spot discard    stops offering it (`%spot restore {line.newest_id}` still loads it until GC)\n"
                "Until then this kernel's snapshots form a line of their own and do not replace it."
            )
        if live:
            said.append(f"jupyter-spot: {self._live_note(session, lines, live)}")
        return "\n".join(said) or None

    def _live_note(self, session: str, lines: dict[str, Line], live: dict[str, dict[str, Any]]) -> str:
        """One sentence: where the session is running, and how to copy its state here."""
        newest = max((lines[line_id] for line_id in live), key=lambda each: each.newest_id)
        return (
            f"session {session!r} is live in {describe_holder(live[newest.id])}, not interrupted; "
            f"`%spot restore {newest.newest_id}` would copy its newest state here as a line of this kernel's own"
        )

    # -- restore ---------------------------------------------------------------
    def choose_latest(self, session: str, ids: list[str]) -> LatestChoice:
        """The interrupted line's snapshots first (newest first), then every other one, newest first.

        Snapshots newer than the line's that do not load come first, so that the
        report names them as fallbacks instead of passing over them in silence.
        """
        newest_first = ids[::-1]
        try:
            line, lines, live = self.interrupted_and_live(session)
        except StoreError as error:
            return LatestChoice(newest_first, [f"could not read the session's lines ({error}): trying the newest "
                                               "snapshot first"])
        if line is None and lines:
            newest = max(lines.values(), key=lambda each: each.newest_id)
            if newest.id in live:  # continuing it here would fork it: two kernels writing one line
                refusal = (f"{self._live_note(session, lines, live)}; "
                           "`latest` does not take over a line another kernel is writing")
                return LatestChoice([], refusal=refusal)
        if line is None:
            notes = [self._live_note(session, lines, live)] if live else []
            return LatestChoice(newest_first, notes)
        known = {snapshot_id for each in lines.values() for snapshot_id in each.snapshots}
        ours = line.snapshots[::-1]
        damaged = [snapshot_id for snapshot_id in newest_first if snapshot_id not in known and snapshot_id > ours[0]]
        first = damaged + ours
        candidates = first + [snapshot_id for snapshot_id in newest_first if snapshot_id not in set(first)]
        notes = []
        newest = max(lines.values(), key=lambda each: each.newest_id)
        if newest.id != line.id:
            whose = "this kernel's own line" if newest.id == self.line else f"line {newest.id}"
            notes.append(
                f"latest: restored the interrupted line {line.id} (nobody restored or discarded it), not the "
                f"newest snapshot {newest.newest_id} of the session ({whose}); `%spot restore {newest.newest_id}` "
                "loads that one"
            )
        # Two kernels lost on one session leave two lines: the one not chosen is named, never passed over.
        decisions = load_decisions(self.store, session)
        other_lines = {
            other.id: f"line {other.id} was interrupted too and nobody restored it (newest snapshot "
                      f"{other.newest_id}); `%spot restore {other.newest_id}` loads it instead"
            for other in sorted(lines.values(), key=lambda each: each.newest_id, reverse=True)
            if other.id not in (line.id, self.line) and undecided(other, decisions)
        }
        return LatestChoice(candidates, notes, set(ours), other_lines)

    def restored(self, session: str, manifest: dict[str, Any]) -> list[str]:
        """This kernel continues the restored snapshot's line: record that, set its own line aside.

        A line another kernel is still writing is copied instead: nothing is recorded, and this
        kernel keeps (or starts, at its next snapshot) a line of its own.
        """
        self.announced = True
        self.index.remember(session, manifest)
        restored = SnapshotLine.of(manifest)
        notes = []
        try:
            lines = self.index.lines(session)
            holder = self.live_lines(session, lines).get(restored.line)
            if holder is not None:
                return [f"copied from line {restored.line}, live in {describe_holder(holder)}, which keeps writing "
                        "it: this kernel's snapshots form a line of their own"]
            line = lines.get(restored.line)
            newest = line.newest_id if line is not None else restored.id
            record_decision(self.store, session, restored.line, RESTORED, max(newest, restored.id), self.by)
            own = lines.get(self.line) if self.line and self.line != restored.line else None
            if own is not None:
                record_decision(self.store, session, own.id, DISCARDED, own.newest_id,
                                f"{self.by} (it restored line {restored.line} over it)")
                notes.append(
                    f"this kernel's own line {own.id} (newest snapshot {own.newest_id}) is set aside as discarded: "
                    "its variables are still in this kernel unless the restore replaced them, and the next "
                    f"snapshot continues line {restored.line}"
                )
        except StoreError as error:
            notes.append(f"could not record the restore of line {restored.line} ({error}); it may be offered again")
        self.line, self.beside = restored.line, restored.beside
        return notes

    # -- discard ---------------------------------------------------------------
    def discard(self, session: str, snapshot: str | None = None) -> str:
        """Stop offering the interrupted line (or ``snapshot``'s line); its snapshots stay until GC."""
        if snapshot is None:
            line, _ = self.interrupted(session)
            if line is None:
                return (f"jupyter-spot: nothing to discard: session {session!r} has no interrupted line (every "
                        "line was restored, discarded or closed, or is this kernel's own)")
        else:
            lines = self.index.lines(session)
            line = next((each for each in lines.values() if snapshot in each.snapshots), None)
            if line is None:
                raise ManifestError(
                    f"session {session!r} has no usable snapshot {snapshot!r} (`%spot list` shows them)"
                )
            if line.id == self.line:
                raise ManifestError(f"{snapshot} is in this kernel's own line: it cannot discard what it is writing")
        record_decision(self.store, session, line.id, DISCARDED, line.newest_id, self.by)
        self.announced = True
        return (
            f"jupyter-spot: discarded line {line.id} of session {session!r} (newest snapshot {line.newest_id}): "
            f"`%spot restore latest` no longer picks it; `%spot restore {line.newest_id}` still loads it until "
            "GC removes it"
        )
