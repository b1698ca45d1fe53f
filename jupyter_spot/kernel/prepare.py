"""Preparing a snapshot: which variables changed, their groups pickled and cut into blobs.

After each cell the engine finds the variables the cell may have changed (see
``tracking``), re-pickles only their groups, hashes the bytes with xxh3 and
hands blobs it has not stored before to the writer thread. A group whose bytes
hash the same as last time costs no write; a group no touched name reaches is
not even pickled. Big out-of-band buffers are cut into chunks (``chunks``), so
a changed element costs one chunk, not its whole array.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..store import StoreError
from . import chunks, environment, serialize, tracking
from .identity import content_key, library_versions
from .results import SnapshotResult
from .writer import Job

if TYPE_CHECKING:
    from .engine import SnapshotEngine

#: Background writes hold a private copy of new data; beyond this many bytes
#: queued, a cell waits for its snapshot instead of copying more (memory first).
MAX_PENDING_COPIES = 2 << 30

#: A fingerprint hashes a memo-less pickle, which writes an object shared by
#: reference out each time: past this many times the group's stored size (plus
#: FINGERPRINT_SLACK) it gives up and the group is pickled again instead.
FINGERPRINT_GROWTH = 4
FINGERPRINT_SLACK = 1 << 20

#: A group whose pickle (out-of-band buffers aside) is smaller keeps no fingerprint:
#: pickling it again with the hooks costs about what hashing its buffers for a
#: fingerprint would (a 1 GiB array: ~40 ms either way), so a fingerprint would
#: only add that hash to the snapshot that stores it.
FINGERPRINT_MIN_PAYLOAD = 64 << 10


def fingerprint_limit(size: int) -> int:
    return FINGERPRINT_GROWTH * size + FINGERPRINT_SLACK


@dataclass(frozen=True)
class Group:
    """Co-variables stored as one pickle, plus the array buffers it points to."""

    names: tuple[str, ...]
    serializer: str
    payload: tuple[str, int]  # (content key, size)
    buffers: tuple[chunks.Layout, ...]
    definition: bool
    #: serialize.fingerprint of the values when they were pickled (explicit snapshots keep one).
    fingerprint: str | None = None

    @property
    def keys(self) -> list[str]:
        return [self.payload[0], *(key for layout in self.buffers for key, _ in layout.pieces)]

    @property
    def size(self) -> int:
        return self.payload[1] + sum(layout.size for layout in self.buffers)


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


class Preparer:
    """The snapshot-preparing half of :class:`~jupyter_spot.kernel.engine.SnapshotEngine`."""

    def _prepare(
        self: SnapshotEngine,
        kind: str,
        referenced: set[str] | None,
        wait: bool,
        during_cell: int | None,
        reason: str | None,
        newest_first: bool = False,
    ) -> tuple[Job, bool]:
        """Pickle what changed and queue the writes; True if they run in the background.

        ``newest_first``: supersede the snapshots still being written (a notice's flush).
        """
        started = time.perf_counter()
        shell = self.shell
        namespace = shell.user_ns
        # Between cells IPython has already moved execution_count on to the next one.
        cell = self._in_cell if self._in_cell is not None else shell.execution_count - 1
        result = SnapshotResult(id=self._new_id(), session=self.session, kind=kind, execution_count=cell,
                                during_cell=during_cell)
        self._jobs = [job for job in self._jobs if not job.done.is_set()]
        self._forget_if_collected()
        if newest_first:
            # A notice's flush goes first: the snapshots still queued stop writing
            # (and never commit), and this one writes whatever of theirs it needs.
            for job in self._jobs:
                job.superseded = True
        in_flight = set() if newest_first else {key for job in self._jobs if not job.abandoned for key, _ in job.blobs}

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

        touched = set() if referenced is None else referenced & current.keys()
        births, self._unsnapshotted_births = self._unsnapshotted_births, {}
        for name, value in current.items():
            if self._ids.get(name) != id(value):
                touched.add(name)
                value_id, born = births.get(name, (None, 0))
                self._born[name] = born if value_id == id(value) and born else cell
        for group in self._groups.values():
            if any(key not in self.durable and key not in in_flight for key in group.keys):
                touched.update(name for name in group.names if name in current)
        if referenced is None and self._unsaved:
            # What a cell named is pickled again, as an automatic snapshot would;
            # only the rest is left to fingerprints, which cannot see sharing.
            touched |= self._unsaved & current.keys()
        fingerprints = self._recheck(current, touched) if referenced is None else {}
        for name in list(self._ids):
            if name not in current:
                for table in (self._ids, self._var_info):
                    table.pop(name, None)
                self._shared.discard(name)
                self._watched.discard(name)

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
                pickled = serialize.dump({name: value}, refs_for(name), definitions=_is_definition(value),
                                         watch=name in self._watched)
            except serialize.Unserializable as error:
                source = self._source_of(name, value) if _is_definition(value) else None
                if source is None:
                    unserializable[name] = str(error)
                    self._shared.discard(name)
                    continue
                pickled = serialize.source_pickle(source)
            singles[name] = pickled
            if pickled.watched:
                self._watched.add(name)
            else:
                self._watched.discard(name)
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
                    pickled = serialize.dump({n: current[n] for n in names}, main_refs,
                                             watch=not self._watched.isdisjoint(names))
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
            fingerprint = None
            if referenced is None and pickled.serializer == "pickle" and len(pickled.payload) >= FINGERPRINT_MIN_PAYLOAD:
                fingerprint = fingerprints.get(key) or serialize.fingerprint(
                    {n: current[n] for n in names}, fingerprint_limit(pickled.size))
            group = self._group_of(tuple(names), pickled, new_blobs, fingerprint)
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
            "manifest_format": chunks.MANIFEST_FORMAT,
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
                buffers = [layout.entry(durable) for layout in group.buffers]
                digests.add(blob)
                digests.update(durable[key] for key in group.keys)
                group_docs[f"g{index}"] = {"names": list(group.names), "serializer": group.serializer,
                                           "definition": group.definition, "blob": blob, "buffers": buffers,
                                           "size": group.size}
            return {**manifest, "groups": group_docs, "rng": durable[rng_key], "blobs": sorted(digests)}

        job = Job(result=result, blobs=blobs, build_manifest=build_manifest, started=started, spare=spare,
                  live=not background)
        self._jobs.append(job)
        self.writer.submit(job)
        return job, background

    def _forget_if_collected(self: SnapshotEngine) -> None:
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

    def _source_of(self: SnapshotEngine, name: str, value: Any) -> str | None:
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

    def _recheck(self: SnapshotEngine, current: dict[str, Any], touched: set[str]) -> dict[frozenset[str], str | None]:
        """Add to ``touched`` every variable whose content may have changed, found without tracking.

        A group stays untouched only if its plain pickle hashes as it did when it
        was stored (:func:`serialize.fingerprint`); anything else — a group with no
        fingerprint (a definition, a dill pickle, one stored by an automatic
        snapshot, one whose pickle is small), one that lost a member, a variable in no group — is pickled
        again. Returns the fingerprints computed, for the groups pickled again.
        """
        fingerprints: dict[frozenset[str], str | None] = {}
        grouped: set[str] = set()
        for key, group in self._groups.items():
            grouped |= key
            if key & touched or not key <= current.keys() or group.fingerprint is None:
                touched.update(key & current.keys())
                continue
            fingerprints[key] = serialize.fingerprint({name: current[name] for name in group.names},
                                                      fingerprint_limit(group.size))
            if fingerprints[key] != group.fingerprint:
                touched.update(key)
        touched.update(current.keys() - grouped)
        return fingerprints

    def _group_of(
        self: SnapshotEngine,
        names: tuple[str, ...],
        pickled: serialize.Pickled,
        new_blobs: dict[str, Any],
        fingerprint: str | None = None,
    ) -> Group:
        payload_key = content_key(pickled.payload)
        new_blobs.setdefault(payload_key, pickled.payload)
        buffers = []
        for buffer in pickled.buffers:
            pieces = []
            for piece in chunks.cut(buffer, self.chunk_size):
                key = content_key(piece)
                new_blobs.setdefault(key, piece)
                pieces.append((key, piece.nbytes))
            buffers.append(chunks.Layout(buffer.nbytes, self.chunk_size if len(pieces) > 1 else 0, tuple(pieces)))
        definition = len(names) == 1 and pickled.serializer in ("dill", "source") and _is_definition(
            self.shell.user_ns[names[0]]
        )
        return Group(names, pickled.serializer, (payload_key, len(pickled.payload)), tuple(buffers), definition,
                     None if definition else fingerprint)
