"""What a snapshot or a restore did, for the magics to print and the server to send."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..units import human_bytes


@dataclass
class SnapshotResult:
    """One snapshot: filled in further by the writer until ``durable`` is true."""

    id: str | None
    session: str
    kind: str
    execution_count: int
    during_cell: int | None = None
    stored: int = 0
    unchanged: int = 0
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_pending: int = 0
    size: int = 0
    seconds: float = 0.0
    durable: bool = False
    error: str | None = None
    #: Snapshots (``session/id``) a tiered store had not yet sent to S3 when a flush's deadline came.
    not_replicated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.error:
            return f"snapshot failed: {self.error}"
        state = "" if self.durable else f" ({human_bytes(self.bytes_pending)} still being written)"
        if self.not_replicated:
            state += f"; {len(self.not_replicated)} snapshot(s) not yet in S3"
        return (
            f"snapshot {self.id}: {self.stored} stored, {self.unchanged} unchanged, "
            f"{len(self.skipped)} skipped; {human_bytes(self.bytes_written)} written in {self.seconds:.2f}s{state}"
        )


@dataclass
class RestoreReport:
    """What a restore brought back, what it could not, and from which snapshot."""

    snapshot_id: str | None
    session: str
    kind: str | None = None
    execution_count: int | None = None
    during_cell: int | None = None
    restored: list[str] = field(default_factory=list)
    not_restored: dict[str, dict[str, Any]] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def ok(self) -> bool:
        return self.error is None and self.snapshot_id is not None

    def __str__(self) -> str:
        lines = [f"fallback: {note}" for note in self.fallbacks]
        if not self.ok:
            lines.append(f"restore failed: {self.error}")
            return "\n".join(lines)
        if self.during_cell is not None:
            where = (
                f"taken while cell {self.during_cell} was running (mid-cell); "
                "`%spot restore --clean` loads the state after the last complete cell instead"
            )
        else:
            where = f"state after cell {self.execution_count}"
        lines.append(f"restored snapshot {self.snapshot_id} ({self.kind}) of session {self.session!r}: {where}")
        shown = ", ".join(self.restored[:30]) + (", …" if len(self.restored) > 30 else "")
        lines.append(f"{len(self.restored)} variables restored in {self.seconds:.2f}s: {shown}")
        for name, info in self.not_restored.items():
            cell = info.get("cell")
            made = f"; created in cell {cell}" if cell else ""
            source = f": {info['source']}" if info.get("source") else ""
            lines.append(f"not restored: {name} ({info.get('type')}) — {info.get('reason')}{made}{source}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
