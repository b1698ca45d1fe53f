"""Snapshots of one kernel's state (restores: kernel/restore.py; lines of descent: kernel/lines.py).

After each cell the engine finds the variables the cell may have changed (see
``tracking``), re-pickles only their groups, hashes the bytes with xxh3 and
hands blobs it has not stored before to the writer thread. A group whose bytes
hash the same as last time costs no write; a group no touched name reaches is
not even pickled.
"""

from __future__ import annotations

import os
import sys
import time
import types
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import IPython

from ..config import SpotSettings, resolve_keep_interrupted_days, resolve_session, resolve_store_url
from ..faults import fault_point
from ..store import Store, StoreError, collect_garbage, open_store
from ..store.keys import KMS_ENV
from ..store.retention import snapshots_to_delete
from . import environment, serialize, tracking
from .identity import content_key, kernel_id, library_versions
from .lines import KernelLines
from .restore import AFTER_RESTORE_HOOKS, Restorer, register_after_restore
from .results import SnapshotResult
from .writer import Job, Writer

__all__ = ["AFTER_RESTORE_HOOKS", "SnapshotEngine", "content_key", "register_after_restore"]

#: Background writes hold a private copy of new data; beyond this many bytes
#: queued, a cell waits for its snapshot instead of copying more (memory first).
MAX_PENDING_COPIES = 2 << 30

#: After a failed automatic snapshot (store down, disk full), cells run without
#: one for this long before the next attempt, instead of paying for it every cell.
RETRY_AFTER_FAILURE = 30.0

#: IPython 9.8 advances ``execution_count`` before a cell runs instead of after
#: it, so while a cell runs the count already names the next one.
COUNT_ADVANCES_BEFORE_CELL = IPython.version_info >= (9, 8)

#: How long a flush with no deadline (SIGTERM) waits for a tiered store to reach S3.
NOTICE_REPLICATION_SECONDS = 20.0


@dataclass(frozen=True)
class Group:
    """Co-variables stored as one pickle, plus the array buffers it points to."""

    names: tuple[str, ...]
    serializer: str
    payload: tuple[str, int]  # (content key, size)
    buffers: tuple[tuple[str, int], ...]
    definition: bool

    @property
    def keys(self) -> list[str]:
        return [self.payload[0], *(key for key, _ in self.buffers)]

    @property
    def size(self) -> int:
        return self.payload[1] + sum(size for _, size in self.buffers)


def _type_name(value: Any) -> str:
    value_type = type(value)
    module = value_type.__module__
    return value_type.__qualname__ if module in ("builtins", "__main__") else f"{module}.{value_type.__qualname__}"


def _is_definition(value: Any) -> bool:
    """A function or class the notebook defined (decorated ones too): stored by
    value, or else as its source, and restored before the data that uses it."""
    if getattr(value, "__module__", None) != "__main__":
        return False
    return isinstance(value, types.FunctionType | type) or (
        hasattr(value, "__wrapped__") and hasattr(value, "__qualname__")
    )


class SnapshotEngine(Restorer):
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
    ) -> SnapshotResult:
        """Snapshot the namespace; ``referenced=None`` re-checks every variable."""
        if self._busy:
            raise RuntimeError("a snapshot is already being taken")
        self._busy = True
        try:
            job, background = self._prepare(kind, referenced, wait, during_cell, reason)
        finally:
            self._busy = False
        self._unsaved = set()
        result = job.result
        self.last_result = result
        if not background and not self.writer.wait(job, deadline):
            result.error = result.error or "the deadline passed before the snapshot was durable"
        error = result.error or (self.writer.last_error if background else None)
        self._failed_at = time.monotonic() if error else None
        if error and quiet:  # auto snapshots warn once; explicit ones print their result
            self._warn(f"snapshot failed: {error}")
        return result

    def _prepare(
        self, kind: str, referenced: set[str] | None, wait: bool, during_cell: int | None, reason: str | None
    ) -> tuple[Job, bool]:
        """Pickle what changed and queue the writes; True if they run in the background."""
        started = time.perf_counter()
        shell = self.shell
        namespace = shell.user_ns
        # Between cells IPython has already moved execution_count on to the next one.
        cell = self._in_cell if self._in_cell is not None else shell.execution_count - 1
        result = SnapshotResult(id=self._new_id(), session=self.session, kind=kind, execution_count=cell,
                                during_cell=during_cell)
        self._jobs = [job for job in self._jobs if not job.done.is_set()]
        self._forget_if_collected()
        in_flight = {key for job in self._jobs for key, _ in job.blobs}

        modules: dict[str, str] = {}
        current: dict[str, Any] = {}
        skipped: dict[str, dict[str, Any]] = {}
        for name in tracking.user_names(namespace, shell.user_ns_hidden):
            value = namespace[name]
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
            elif name in self.excluded:
                skipped[name] = {"type": _type_name(value), "reason": "excluded with %spot exclude"}
            else:
                current[name] = value

        touched = set(current) if referenced is None else referenced & current.keys()
        births, self._unsnapshotted_births = self._unsnapshotted_births, {}
        for name, value in current.items():
            if self._ids.get(name) != id(value):
                touched.add(name)
                value_id, born = births.get(name, (None, 0))
                self._born[name] = born if value_id == id(value) and born else cell
        for group in self._groups.values():
            if any(key not in self.durable and key not in in_flight for key in group.keys):
                touched.update(name for name in group.names if name in current)
        for name in list(self._ids):
            if name not in current:
                for table in (self._ids, self._var_info):
                    table.pop(name, None)
                self._shared.discard(name)

        main_refs: dict[int, str] = {}
        for name, value in current.items():
            if _is_definition(value):
                main_refs.setdefault(id(value), name)

        def refs_for(name: str) -> dict[int, str]:
            value = current[name]
            if main_refs.get(id(value)) == name:
                return {key: other for key, other in main_refs.items() if key != id(value)}
            return main_refs

        singles: dict[str, serialize.Pickled] = {}
        unserializable: dict[str, str] = {}
        for name in [n for n in current if n in touched]:
            value = current[name]
            self._ids[name] = id(value)
            try:
                pickled = serialize.dump({name: value}, refs_for(name), definitions=_is_definition(value))
            except serialize.Unserializable as error:
                source = self._source_of(name, value) if _is_definition(value) else None
                if source is None:
                    unserializable[name] = str(error)
                    self._shared.discard(name)
                    continue
                pickled = serialize.source_pickle(source)
            singles[name] = pickled
            if _is_definition(value):
                self._shared.discard(name)  # restored first and referenced by name: never grouped
                self._shared.reach[name] = {}
            else:
                self._shared.set(name, pickled.reached)
            self._var_info[name] = {"type": _type_name(value), "size": pickled.size}
        for name in current:
            if name not in touched and name not in self._shared.reach:
                unserializable.setdefault(name, self._var_info.get(name, {}).get("reason", "could not be pickled"))
        for name, why in unserializable.items():
            self._var_info[name] = {"type": _type_name(current[name]), "size": 0, "reason": why}
            skipped[name] = {"type": _type_name(current[name]), "reason": why}
        for name, info in skipped.items():
            info["cell"] = self._born.get(name)
            info["source"] = self._source_line(info["cell"])

        # co-variables: variables whose pickles reached a common object
        members = self._shared.groups(n for n in current if n not in unserializable)
        groups: dict[frozenset[str], Group] = {}
        new_blobs: dict[str, Any] = {}
        for names in members:
            key = frozenset(names)
            previous = self._groups.get(key)
            if previous is not None and not key & touched:
                groups[key] = previous
                result.unchanged += len(names)
                continue
            try:
                if len(names) == 1 and names[0] in singles:
                    pickled = singles[names[0]]
                else:
                    pickled = serialize.dump({n: current[n] for n in names}, main_refs)
            except serialize.Unserializable as error:  # together they need dill and dill refuses: store apart
                for name in names:
                    try:
                        single = singles.get(name) or serialize.dump({name: current[name]}, refs_for(name))
                    except serialize.Unserializable:
                        skipped[name] = {"type": _type_name(current[name]), "reason": str(error),
                                         "cell": self._born.get(name), "source": self._source_line(self._born.get(name))}
                        continue
                    groups[frozenset([name])] = self._group_of((name,), single, new_blobs)
                    result.stored += 1
                continue
            group = self._group_of(tuple(names), pickled, new_blobs)
            groups[key] = group
            if previous is not None and previous.keys == group.keys:
                result.unchanged += len(names)
            else:
                result.stored += len(names)
        self._groups = groups

        info, rng_state = environment.capture(self.baseline, modules)
        rng_key = content_key(rng_state)
        new_blobs.setdefault(rng_key, rng_state)
        # Blobs an earlier, still queued snapshot writes are durable before this
        # one commits (the writer goes in order), so they are not written twice.
        blobs = [(key, data) for key, data in new_blobs.items() if key not in self.durable and key not in in_flight]
        spare = {key: data for key, data in new_blobs.items() if key in self.durable or key in in_flight}
        new_bytes = sum(memoryview(data).nbytes for _, data in blobs)
        background = (
            not wait
            and (new_bytes > self.settings.background_threshold or not self.writer.idle)
            and self.writer.pending_bytes + new_bytes <= MAX_PENDING_COPIES
        )
        if background:
            # The cell's prompt comes back now; the arrays may change under a
            # background write, so it writes a copy.
            blobs = [(key, data if isinstance(data, bytes) else bytes(data)) for key, data in blobs]
        result.skipped = skipped
        result.size = sum(group.size for group in groups.values()) + len(rng_state)
        variables = {}
        for index, group in enumerate(groups.values()):
            for name in group.names:
                info_ = self._var_info.get(name, {})
                variables[name] = {"group": f"g{index}", "type": info_.get("type"), "size": info_.get("size", 0),
                                   "cell": self._born.get(name)}
        manifest = {
            **self.lines.manifest_fields(self.session, result.id),
            "session": self.session,
            "id": result.id,
            "created": datetime.now(timezone.utc).isoformat(),
            "kind": kind,
            "reason": reason,
            "execution_count": cell,
            "during_cell": during_cell,
            "variables": variables,
            "skipped": skipped,
            "environment": info,
            "versions": library_versions(),
            "excluded": sorted(self.excluded),
            "size": result.size,
            "variable_count": len(variables),
        }
        group_list = list(groups.values())

        def build_manifest(durable: dict[str, str]) -> dict[str, Any]:
            group_docs = {}
            digests = {durable[rng_key]}
            for index, group in enumerate(group_list):
                blob = durable[group.payload[0]]
                buffers = [durable[key] for key, _ in group.buffers]
                digests.add(blob)
                digests.update(buffers)
                group_docs[f"g{index}"] = {"names": list(group.names), "serializer": group.serializer,
                                           "definition": group.definition, "blob": blob, "buffers": buffers,
                                           "size": group.size}
            return {**manifest, "groups": group_docs, "rng": durable[rng_key], "blobs": sorted(digests)}

        job = Job(result=result, blobs=blobs, build_manifest=build_manifest, started=started, spare=spare)
        self._jobs.append(job)
        self.writer.submit(job)
        return job, background

    def _forget_if_collected(self) -> None:
        """Forget the blobs a garbage collection deleted since we last looked, so this
        snapshot stores them again.

        Only blobs of the current state are kept, and only those the store still
        has (an existence check each, cheaper than storing the state again); the
        rest — values since replaced — are forgotten. Only while no snapshot is
        being written, whose manifest still needs those digests; until then the
        store's commit check and the writer's repair cover it.
        """
        try:
            generation = self.store.collection_generation()
        except StoreError:
            return  # this snapshot's own writes will meet the store's trouble and report it
        if self._generation_seen and generation == self._generation:
            return
        if self._generation_seen and self.durable:
            if not self.writer.idle:
                return  # looked at again by the next snapshot
            current = {key for group in self._groups.values() for key in group.keys}
            believed = {key: digest for key, digest in self.durable.items() if key in current}
            try:
                gone = set(self.store.missing_blobs(sorted(set(believed.values()))))
            except StoreError:
                believed, gone = {}, set()
            self.durable.clear()
            self.durable.update({key: digest for key, digest in believed.items() if digest not in gone})
        self._generation, self._generation_seen = generation, True

    def _source_of(self, name: str, value: Any) -> str | None:
        """The cell code that defined a notebook definition no pickler can rebuild."""
        known = self._sources.get(name)
        if known is not None and known[0] == id(value):
            return known[1]
        history = self.shell.user_ns.get("In")
        if not isinstance(history, list):
            return None
        born = self._born.get(name)
        order = [born] if born is not None and 0 < born < len(history) else []
        order += [cell for cell in range(len(history) - 1, 0, -1) if cell != born]

        def cells() -> Any:
            for cell in order:
                try:
                    yield self.shell.transform_cell(history[cell])
                except Exception:
                    continue

        source = tracking.definition_source(name, cells())
        if source is not None:
            self._sources[name] = (id(value), source)
        return source

    def _group_of(self, names: tuple[str, ...], pickled: serialize.Pickled, new_blobs: dict[str, Any]) -> Group:
        payload_key = content_key(pickled.payload)
        new_blobs.setdefault(payload_key, pickled.payload)
        buffers = []
        for buffer in pickled.buffers:
            key = content_key(buffer)
            new_blobs.setdefault(key, buffer)
            buffers.append((key, buffer.nbytes))
        definition = len(names) == 1 and pickled.serializer in ("dill", "source") and _is_definition(
            self.shell.user_ns[names[0]]
        )
        return Group(names, pickled.serializer, (payload_key, len(pickled.payload)), tuple(buffers), definition)

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
            result = self.snapshot(
                "mid-cell", referenced=referenced, during_cell=self._in_cell, deadline=until, reason=reason
            )
        else:
            result = self.snapshot("notice", deadline=until, reason=reason)
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
