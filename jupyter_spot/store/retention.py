"""Retention: drop old snapshots, then the blobs no kept snapshot references."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..faults import fault_point
from .base import Store
from .errors import ManifestError, StoreError
from .lines import KEEP_INTERRUPTED_DAYS, LineIndex, load_decisions, protected_snapshots
from .manifest import unverified_body

#: A blob younger than this is never collected: a snapshot being written right
#: now may have stored (or re-used) it and not yet committed its manifest.
GRACE_SECONDS = 15 * 60


@dataclass
class GCReport:
    snapshots_deleted: list[str] = field(default_factory=list)
    blobs_deleted: int = 0
    blobs_kept: int = 0
    #: True when a writer was storing a snapshot, so blobs were left for next time.
    blobs_deferred: bool = False
    #: Half-written files that killed writers left behind (a filesystem store's).
    temporaries_deleted: int = 0

    def __str__(self) -> str:
        if self.blobs_deferred:
            return (
                f"deleted {len(self.snapshots_deleted)} snapshot(s) and {self.blobs_deleted} blob(s); "
                "the rest are left for the next run because another writer is storing a snapshot"
            )
        swept = f", {self.temporaries_deleted} half-written file(s) of killed writers" if self.temporaries_deleted else ""
        return (
            f"deleted {len(self.snapshots_deleted)} snapshot(s) and {self.blobs_deleted} blob(s){swept}; "
            f"{self.blobs_kept} blob(s) still referenced or too recent"
        )


def referenced_blobs(store: Store, session: str, snapshot_id: str) -> set[str] | None:
    """Blobs a manifest names, read even if its signature fails; None if unreadable."""
    try:
        return set(store.load_manifest(session, snapshot_id).get("blobs", []))
    except ManifestError:
        pass
    try:
        return set(unverified_body(store._read_manifest(session, snapshot_id)).get("blobs", []))
    except (ValueError, KeyError, TypeError, StoreError):
        return None


def pinned_blobs(store: Store) -> set[str]:
    """Blobs records hold on to through their ``blobs`` list (a job's inputs, outputs, checkpoint)."""
    pinned: set[str] = set()
    for name in store.list_records():
        try:
            record = store.get_record(name)
        except StoreError:
            continue
        blobs = record.get("blobs") if isinstance(record, dict) else None
        if isinstance(blobs, list):
            pinned.update(digest for digest in blobs if isinstance(digest, str))
    return pinned


def snapshots_to_delete(
    store: Store,
    session: str,
    keep: int,
    keep_interrupted_days: float = KEEP_INTERRUPTED_DAYS,
    index: LineIndex | None = None,
    spare: frozenset[str] = frozenset(),
) -> list[str]:
    """The session's snapshots beyond its newest ``keep``, except the newest snapshot of
    every line nobody restored or discarded (for ``keep_interrupted_days``) and ``spare``.

    Every retention (a kernel's after each commit, the server's GC, ``jupyter spot gc``)
    goes through here, so none of them can collect state a user has not decided about.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: the latest snapshot is never collected")
    ids = store.list_snapshots(session)
    beyond = [snapshot_id for snapshot_id in ids[:-keep] if snapshot_id not in spare]
    if not beyond:
        return []
    lines = (index or LineIndex(store)).lines(session, ids)
    protected = protected_snapshots(lines, load_decisions(store, session), keep_interrupted_days)
    return [snapshot_id for snapshot_id in beyond if snapshot_id not in protected]


def collect_garbage(
    store: Store,
    keep: int,
    session: str | None = None,
    grace_seconds: float = GRACE_SECONDS,
    keep_interrupted_days: float = KEEP_INTERRUPTED_DAYS,
) -> GCReport:
    """Keep the newest ``keep`` snapshots of each session (or of one) and the newest of
    every undecided line, then delete unreferenced blobs older than ``grace_seconds``."""
    if keep < 1:
        raise ValueError("keep must be at least 1: the latest snapshot is never collected")
    report = GCReport()
    sessions = [session] if session is not None else store.list_sessions()
    index = LineIndex(store)
    for name in sessions:
        for snapshot_id in snapshots_to_delete(store, name, keep, keep_interrupted_days, index):
            store.delete_snapshot(name, snapshot_id)
            report.snapshots_deleted.append(f"{name}/{snapshot_id}")
    # A store shared by writers on other machines (S3) says whether blobs may
    # go: its guard is held from before the scan of references to the end, and
    # it says no as soon as a writer is storing a snapshot.
    sweep = getattr(store, "remove_stale_temporaries", None)
    if sweep is not None:
        report.temporaries_deleted = sweep(grace_seconds)
    guard = getattr(store, "blob_gc_guard", None)
    with guard() if guard else contextlib.nullcontext(lambda: True) as may_delete:
        in_use = _blobs_in_use(store, may_delete)
        if in_use is None:
            report.blobs_deferred = True
            return report
        announced = False
        for digest in list(store.iter_blobs()):
            if not may_delete():
                report.blobs_deferred = True
                break
            if digest in in_use or store.blob_age(digest) < grace_seconds:
                report.blobs_kept += 1
                continue
            if not announced:
                # Before the first deletion, so even a collector killed half-way
                # makes every writer forget which blobs it believed stored.
                store.announce_collection()
                announced = True
            fault_point("gc-delete")
            store.delete_blob(digest)
            report.blobs_deleted += 1
    return report


def _blobs_in_use(store: Store, may_delete: Callable[[], bool]) -> set[str] | None:
    """Every blob a manifest names or a record pins; None as soon as ``may_delete``
    says a writer came (it asks the store at most once a second), so a writer never
    waits for a scan of the whole store."""
    if not may_delete():  # takes the collector's lock before listing what references blobs
        return None
    in_use: set[str] = set()
    for name in store.list_sessions():
        for snapshot_id in store.list_snapshots(name):
            if not may_delete():
                return None
            fault_point("gc-scan")
            blobs = referenced_blobs(store, name, snapshot_id)
            if blobs is not None:
                in_use |= blobs
    if not may_delete():
        return None
    return in_use | pinned_blobs(store)
