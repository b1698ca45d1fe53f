"""Snapshots of one kernel's state: the cell hooks, flushes and status.

What a snapshot pickles and writes is prepared in kernel/prepare.py; restores are
kernel/restore.py; lines of descent kernel/lines.py; the writes kernel/writer.py.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import IPython

from ..config import SpotSettings, resolve_keep_interrupted_days, resolve_session, resolve_store_url
from ..faults import fault_point
from ..store import Store, collect_garbage, open_store
from ..store.keys import KMS_ENV
from ..store.retention import snapshots_to_delete
from . import chunks, environment, tracking
from .identity import content_key, kernel_id
from .lines import KernelLines
from .prepare import Group, Preparer
from .restore import AFTER_RESTORE_HOOKS, Restorer, register_after_restore
from .results import SnapshotResult
from .writer import ABANDONED, Job, Writer

__all__ = ["AFTER_RESTORE_HOOKS", "SnapshotEngine", "content_key", "register_after_restore"]


#: After a failed automatic snapshot (store down, disk full), cells run without
#: one for this long before the next attempt, instead of paying for it every cell.
RETRY_AFTER_FAILURE = 30.0

#: IPython 9.8 advances ``execution_count`` before a cell runs instead of after
#: it, so while a cell runs the count already names the next one.
COUNT_ADVANCES_BEFORE_CELL = IPython.version_info >= (9, 8)

#: How long a flush with no deadline (SIGTERM) waits for a tiered store to reach S3.
NOTICE_REPLICATION_SECONDS = 20.0


class SnapshotEngine(Preparer, Restorer):
    """Snapshot and restore for one IPython shell."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.settings = SpotSettings(parent=shell)
        self.store_url = resolve_store_url(self.settings.store)
        if self.settings.kms_key_id:  # as the variable, so the jobs this kernel starts use it too
            os.environ.setdefault(KMS_ENV, self.settings.kms_key_id)
        self.kernel_id = kernel_id()
        self.session = resolve_session(self.settings.session, kernel_id=self.kernel_id)
        self.store: Store = open_store(self.store_url)
        self.lines = KernelLines(self.store, self.kernel_id)
        self.auto = self.settings.auto_snapshot
        self.excluded: set[str] = set(self.settings.exclude)
        self.baseline = environment.Baseline()
        self.durable: dict[str, str] = {}
        self.writer = Writer(self.store, self.durable, self._committed, parent=None)
        self._generation: str | None = None  # the store's collection generation `durable` is valid for
        self._generation_seen = False
        self.last_result: SnapshotResult | None = None
        self.last_clean_id: str | None = None
        self._ids: dict[str, int] = {}
        self._born: dict[str, int] = {}
        # name → (id of value, cell) for values bound by cells no snapshot followed
        # (`%spot off`, a failing store), so a report still names the cell that made them
        self._unsnapshotted_births: dict[str, tuple[int, int]] = {}
        self._shared = tracking.SharedObjects()
        self._watched: set[str] = set()  # names whose last pickle needed serialize's Python hooks
        self._var_info: dict[str, dict[str, Any]] = {}
        self._groups: dict[frozenset[str], Group] = {}
        self._sources: dict[str, tuple[int, str]] = {}  # name → (id of value, defining code)
        self._jobs: list[Job] = []
        self._last_id_time: datetime | None = None
        self._busy = False
        self._in_cell: int | None = None
        self._count_advances_after_cell = False
        self._cell_source = ""
        self._warned = False
        self._unsaved: set[str] | None = set()  # names cells used since the last snapshot; None: all
        self._failed_at: float | None = None
        try:
            self.keep_interrupted_days = resolve_keep_interrupted_days(self.settings.keep_interrupted_days)
        except ValueError as error:
            self.keep_interrupted_days = self.settings.keep_interrupted_days
            self._warn(f"{error}; keeping interrupted lines for {self.keep_interrupted_days:g} days")
        self.chunk_size, problem = chunks.resolve_chunk_size(self.settings.chunk_size)
        if problem:
            print(f"jupyter-spot: {problem}", file=sys.stderr)

    # -- cell hooks ------------------------------------------------------------
    def pre_run_cell(self, info: Any) -> None:
        # A cell run with store_history=False (a silent %spot from a client) takes no
        # number: its state is that of the last numbered cell, and the count stays put.
        numbered = getattr(info, "store_history", True)
        self._in_cell = self.shell.execution_count - (COUNT_ADVANCES_BEFORE_CELL if numbered else 1)
        self._count_advances_after_cell = numbered and not COUNT_ADVANCES_BEFORE_CELL
        self._cell_source = getattr(info, "raw_cell", "") or ""
        if not self._only_spot_lines():  # `%spot restore` or `discard` first: nothing to announce then
            self._announce()

    def post_run_cell(self, result: Any) -> None:
        cell, self._in_cell = self._in_cell, None
        self._count_advances_after_cell = False
        self._announce()  # the cell that ran `%load_ext jupyter_spot` says it too
        if self._only_spot_lines():
            return  # `%spot …` cells snapshot (or restore) themselves, or only look
        # Remembered until a snapshot covers them: with `%spot off`, or while a
        # failing store is given time, cells still change things in place.
        self._unsaved = self._with_cell(self._unsaved, self._cell_source)
        names = tracking.user_names(self.shell.user_ns, self.shell.user_ns_hidden)
        if not names:
            return  # nothing to protect yet (an empty snapshot would hide a session's real latest one)
        failing = self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_FAILURE
        if not self.auto or failing:
            self._note_births(names, cell)
            return
        try:
            self.snapshot(kind="auto", referenced=self._unsaved, wait=False, quiet=True)
        except Exception as error:  # a snapshot bug must never break the user's cells
            self._failed_at = time.monotonic()
            self._warn(f"snapshot failed: {type(error).__name__}: {error}")

    def _only_spot_lines(self) -> bool:
        lines = [line.strip() for line in self._cell_source.splitlines() if line.strip()]
        return all(line.startswith("%spot") for line in lines)

    def _announce(self) -> None:
        """Once, in the first cell's output: state in this session that this kernel did not restore."""
        if self.lines.announced:
            return
        try:
            text = self.lines.announcement(self.session)
        except Exception as error:  # never break the user's cell; a store that fails warns once
            self._warn(f"could not check this session for state to restore: {type(error).__name__}: {error}")
            return
        if text:
            print(text)

    def _note_births(self, names: list[str], cell: int | None) -> None:
        """Remember which cell bound each new value until a snapshot records it."""
        for name in names:
            value_id = id(self.shell.user_ns[name])
            if self._ids.get(name) != value_id and self._unsnapshotted_births.get(name, (None,))[0] != value_id:
                self._unsnapshotted_births[name] = (value_id, cell or 0)

    def _with_cell(self, names: set[str] | None, raw_cell: str) -> set[str] | None:
        referenced = self._cell_references(raw_cell)
        return None if names is None or referenced is None else names | referenced

    def _cell_references(self, raw_cell: str) -> set[str] | None:
        """Names a cell may have changed in place; None: it may have changed anything."""
        try:
            source = self.shell.transform_cell(raw_cell)
        except Exception:
            source = raw_cell
        referenced = tracking.cell_names(source)
        return None if referenced is None else tracking.reachable_names(referenced, self.shell.user_ns)

    # -- snapshot --------------------------------------------------------------
    def _new_id(self) -> str:
        now = datetime.now(timezone.utc)
        if self._last_id_time is not None and now <= self._last_id_time:
            now = self._last_id_time + timedelta(microseconds=1)
        self._last_id_time = now
        return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + os.urandom(2).hex()

    def _source_line(self, cell: int | None) -> str:
        history = self.shell.user_ns.get("In")
        if not cell or not isinstance(history, list) or cell >= len(history):
            return ""
        lines = [line for line in str(history[cell]).splitlines() if line.strip()]
        return lines[0][:100] if lines else ""

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"jupyter-spot: {message}\n(the kernel keeps working; snapshots resume once this is fixed)",
                  file=sys.stderr)

    def snapshot(
        self,
        kind: str = "explicit",
        referenced: set[str] | None = None,
        wait: bool = True,
        during_cell: int | None = None,
        deadline: float | None = None,
        reason: str | None = None,
        quiet: bool = False,
        newest_first: bool = False,
    ) -> SnapshotResult:
        """Snapshot the namespace; ``referenced=None`` re-checks every variable.

        ``newest_first``: the snapshots still queued stop writing and never commit;
        this one writes what it needs of theirs itself (a notice's flush, so its
        deadline is not spent on states it replaces).
        """
        if self._busy:
            raise RuntimeError("a snapshot is already being taken")
        self._busy = True
        try:
            job, background = self._prepare(kind, referenced, wait, during_cell, reason, newest_first)
        finally:
            self._busy = False
        if newest_first:
            fault_point("flush-queued")
        self._unsaved = set()
        result = job.result
        self.last_result = result
        if not background and not self.writer.wait(job, deadline):
            # The caller goes on (a cell resumes) and may change what is still to be written.
            for each in self._jobs:
                if each.live:
                    self.writer.abandon(each)
            result.error = result.error or (ABANDONED if job.abandoned else
                                            "the deadline passed before the snapshot was durable")
        error = result.error or (self.writer.last_error if background else None)
        self._failed_at = time.monotonic() if error else None
        if error and quiet:  # auto snapshots warn once; explicit ones print their result
            self._warn(f"snapshot failed: {error}")
        return result


    def _committed(self, manifest: dict[str, Any]) -> None:
        """Writer thread, after a commit: apply retention by snapshot count (store/retention.py)."""
        self._warned = False
        session = manifest["session"]
        self.lines.index.remember(session, manifest)
        if manifest.get("during_cell") is None:
            self.last_clean_id = manifest["id"]
        keep = self.settings.keep
        if keep > 0:
            spare = frozenset({self.last_clean_id} if self.last_clean_id else ())
            for snapshot_id in snapshots_to_delete(
                self.store, session, keep, self.keep_interrupted_days, self.lines.index, spare
            ):
                self.store.delete_snapshot(session, snapshot_id)

    def flush(self, reason: str, deadline: datetime | None = None) -> SnapshotResult:
        """A final snapshot on an interruption notice, durable before it returns.

        Safe from a signal handler on the main thread: if the handler
        interrupted a snapshot in progress, it only waits for the writes already
        queued; if it interrupted a running cell, the snapshot is a mid-cell one.
        """
        until = None if deadline is None else time.monotonic() + (deadline - datetime.now(timezone.utc)).total_seconds()
        fault_point("notice-flush")
        if self._busy:
            self.writer.wait(deadline=until)
            return self.last_result or SnapshotResult(None, self.session, "notice", self._in_cell or 0,
                                                      error="interrupted a snapshot in progress")
        if self._in_cell is not None:
            # With automatic snapshots on, only what the running cell can reach
            # changed since the last one: the flush costs what a cell's snapshot costs.
            referenced = self._with_cell(self._unsaved, self._cell_source)
            result = self.snapshot("mid-cell", referenced=referenced, during_cell=self._in_cell, deadline=until,
                                   reason=reason, newest_first=True)
        else:
            result = self.snapshot("notice", deadline=until, reason=reason, newest_first=True)
        replicate = getattr(self.store, "flush_replication", None)
        if replicate is not None and result.durable:
            # A tiered store has the snapshot on local disk/EFS; the notice is the
            # last chance to get it to S3 before the machine (and its disk) goes.
            send_by = time.time() + NOTICE_REPLICATION_SECONDS if deadline is None else deadline.timestamp()
            result.not_replicated = replicate(send_by)
        return result

    def status(self) -> dict[str, Any]:
        last = self.last_result
        return {
            "store": self.store.url,
            "store_kind": self.store.kind,
            "session": self.session,
            "auto_snapshot": self.auto,
            "pending_snapshots": self.writer.pending_snapshots,
            "pending_blobs": self.writer.pending_blobs,
            "pending_bytes": self.writer.pending_bytes,
            "last_snapshot": None if last is None else last.to_dict(),
            "last_committed": self.writer.last_committed,
            "last_error": self.writer.last_error,
            "excluded": sorted(self.excluded),
        }

    def rename_session(self, session: str) -> str | None:
        """Snapshot under ``session`` from now on (its notebook was renamed or moved).

        The state so far is snapshotted under the new name at once; blobs belong
        to the whole store, so that snapshot writes little more than a manifest.
        Returns its id (None when there is nothing to snapshot yet).
        """
        if session == self.session:
            return None
        self.session = session
        if not tracking.user_names(self.shell.user_ns, self.shell.user_ns_hidden):
            return None
        return self.snapshot(kind="auto", referenced=self._unsaved, wait=False, quiet=True).id

    def wait_until_durable(self, timeout: float | None = None) -> bool:
        return self.writer.wait(deadline=None if timeout is None else time.monotonic() + timeout)

    def gc(self, keep: int) -> Any:
        self.wait_until_durable()
        return collect_garbage(self.store, keep, session=self.session, keep_interrupted_days=self.keep_interrupted_days)
