"""Restores: load a snapshot into this kernel, falling back past damaged ones, and say what was done.

``latest`` is the interrupted line's newest snapshot while nobody has restored
or discarded it (kernel/lines.py); the report says when that is not the
session's newest snapshot, and when a damaged snapshot made it fall back.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..faults import fault_point
from ..store import ManifestError, StoreError, UnknownKeyError
from . import chunks, environment, serialize
from .identity import content_key, library_versions, parse_id_time
from .results import RestoreReport

if TYPE_CHECKING:
    from .engine import SnapshotEngine

#: Functions registered with ``@jupyter_spot.after_restore``.
AFTER_RESTORE_HOOKS: list[Callable[..., Any]] = []
_HOOK_MARK = "__jupyter_spot_after_restore__"


def register_after_restore(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Register (or, when a cell is re-run, replace) a hook.

    The mark travels with a notebook function into the snapshot, so the
    restored kernel finds the hook again without the cell being re-run.
    """
    name = (getattr(hook, "__module__", None), getattr(hook, "__qualname__", None))
    AFTER_RESTORE_HOOKS[:] = [
        h for h in AFTER_RESTORE_HOOKS if (getattr(h, "__module__", None), getattr(h, "__qualname__", None)) != name
    ]
    AFTER_RESTORE_HOOKS.append(hook)
    try:
        setattr(hook, _HOOK_MARK, True)
    except AttributeError:
        pass  # a builtin: it cannot carry the mark
    return hook


class Restorer:
    """The restore half of :class:`~jupyter_spot.kernel.engine.SnapshotEngine`."""

    def restore(
        self: SnapshotEngine, snapshot: str = "latest", session: str | None = None, clean: bool = False
    ) -> RestoreReport:
        """Load a snapshot into this kernel, falling back to older ones if it is damaged."""
        started = time.perf_counter()
        session = session or self.session
        report = RestoreReport(snapshot_id=None, session=session)
        self.wait_until_durable(timeout=300)
        self._forget_if_collected()  # before reading: the blobs read are then known stored as of now
        try:
            ids = self.store.list_snapshots(session)
        except StoreError as error:
            report.error = str(error)
            return report
        if not ids:
            report.error = f"session {session!r} has no snapshots in {self.store.url} (`%spot list` shows what there is)"
            return report
        choice = None
        if snapshot == "latest" and session == self.session:
            choice = self.lines.choose_latest(session, ids)
            if choice.refusal is not None:
                report.error = choice.refusal
                return report
            candidates = choice.candidates
        elif snapshot == "latest":
            candidates = ids[::-1]
        elif snapshot in ids:
            candidates = ids[: ids.index(snapshot) + 1][::-1]
        else:
            report.error = f"session {session!r} has no snapshot {snapshot!r} (`%spot list` shows what there is)"
            return report
        loaded = None
        missing_key: UnknownKeyError | None = None
        for snapshot_id in candidates:
            try:
                manifest = self.store.load_manifest(session, snapshot_id)
            except ManifestError as error:
                report.fallbacks.append(f"snapshot {snapshot_id} cannot be used: {error}")
                if isinstance(error, UnknownKeyError):
                    missing_key = missing_key or error
                continue
            except StoreError as error:
                report.fallbacks.append(f"snapshot {snapshot_id} cannot be used: {error}")
                continue
            if clean and manifest.get("during_cell") is not None:
                continue
            try:
                blobs = chunks.read_snapshot(self.store, manifest)
            except StoreError as error:
                report.fallbacks.append(f"snapshot {snapshot_id} cannot be used: {error}")
                continue
            loaded = manifest, blobs
            break
        fault_point("restore")
        if loaded is None:
            report.error = f"no usable snapshot of session {session!r} in {self.store.url}"
            if missing_key is not None:  # the fresh-machine case: say once what to set
                report.error += f"; signed with a key this machine does not have. Fix: {missing_key.fix}"
            return report
        self._apply(*loaded, report)
        if choice is not None and (loaded[0]["id"] in choice.line_snapshots or not choice.line_snapshots):
            report.notes[:0] = choice.notes
        if choice is not None:
            report.notes.extend(note for line, note in choice.other_lines.items() if line != loaded[0].get("line"))
        if session == self.session:
            report.notes.extend(self.lines.restored(session, loaded[0]))
        report.seconds = time.perf_counter() - started
        return report

    def _apply(
        self: SnapshotEngine, manifest: dict[str, Any], read: chunks.SnapshotBytes, report: RestoreReport
    ) -> None:
        blobs = read.blobs
        namespace = self.shell.user_ns
        report.snapshot_id = manifest["id"]
        report.kind = manifest.get("kind")
        report.execution_count = manifest.get("execution_count")
        report.during_cell = manifest.get("during_cell")
        if report.fallbacks:
            report.fallbacks.append(f"fell back to snapshot {manifest['id']} (state after cell {report.execution_count})")
        self.excluded.update(manifest.get("excluded", []))
        env = manifest.get("environment", {})
        modules, notes = environment.import_modules(env)
        namespace.update(modules)
        report.notes.extend(notes)
        here = library_versions()
        for library, version in manifest.get("versions", {}).items():
            if library in here and here[library].split(".")[:2] != str(version).split(".")[:2]:
                report.notes.append(f"the snapshot was taken with {library} {version}; this kernel has {here[library]}")

        groups = manifest.get("groups", {})
        failures: dict[str, str] = {}

        def load(name: str, group: dict[str, Any]) -> None:
            values = serialize.load(blobs[group["blob"]], read.buffers(name, group), group["serializer"], namespace)
            if group["serializer"] == "source":
                values = {name: namespace[name] for name in group["names"]}
                self._sources.update({name: (id(v), bytes(blobs[group["blob"]]).decode()) for name, v in values.items()})
            namespace.update(values)
            report.restored.extend(values)

        # Definitions first, then data; whatever refers to something not yet
        # restored (a subclass to its base, an instance to a class kept as
        # source) is retried until a round makes no progress.
        pending = sorted(groups.items(), key=lambda item: not item[1].get("definition"))
        while pending:
            failed = []
            for group_name, group in pending:
                try:
                    load(group_name, group)
                except Exception as error:
                    failures.update({name: f"{type(error).__name__}: {error}" for name in group["names"]})
                    failed.append((group_name, group))
                else:
                    for name in group["names"]:
                        failures.pop(name, None)
            if len(failed) == len(pending):
                break
            pending = failed
        variables = manifest.get("variables", {})
        for name, why in failures.items():
            cell = variables.get(name, {}).get("cell")
            report.not_restored[name] = {"type": variables.get(name, {}).get("type"), "reason": f"failed to load: {why}",
                                         "cell": cell, "source": ""}
        for name, info in manifest.get("skipped", {}).items():
            report.not_restored[name] = info
        rng = manifest.get("rng")
        report.notes.extend(environment.apply(env, bytes(blobs[rng]) if rng else None))

        # Continue the lineage: the next snapshot's parent is this one, with a later id.
        count = manifest.get("execution_count")
        if count is not None:
            if count < self.shell.execution_count:
                try:  # IPython's history database refuses a line number twice in one session
                    history = self.shell.history_manager
                    history.writeout_cache()  # lines typed so far belong to the old session
                    history.new_session()
                except Exception:
                    pass
            # The next cell is count + 1. %spot restore runs in a cell, and IPython before
            # 9.8 advances the count after it; a silent request (the server's restore,
            # `jupyter spot run`), a cell outside the history and newer IPython do not.
            self.shell.execution_count = count if self._count_advances_after_cell else count + 1
        id_time = parse_id_time(manifest["id"])
        if id_time is not None and (self._last_id_time is None or id_time > self._last_id_time):
            self._last_id_time = id_time
        self.durable.update(read.content_keys(content_key))
        self.writer.last_committed = manifest["id"]
        self._ids.clear()
        self._groups.clear()
        for name, info in variables.items():
            if info.get("cell") is not None:
                self._born[name] = info["cell"]
        for name, info in manifest.get("skipped", {}).items():
            if info.get("cell") is not None:
                self._born[name] = info["cell"]
        self._run_hooks(report)

    def _run_hooks(self: SnapshotEngine, report: RestoreReport) -> None:
        for name in report.restored:
            value = self.shell.user_ns.get(name)
            if callable(value) and getattr(value, _HOOK_MARK, False):
                register_after_restore(value)
        for hook in list(AFTER_RESTORE_HOOKS):
            try:
                takes_report = len(inspect.signature(hook).parameters) > 0
                hook(report) if takes_report else hook()
            except Exception as error:
                report.notes.append(f"after_restore hook {getattr(hook, '__name__', hook)!r} failed: "
                                    f"{type(error).__name__}: {error}")
