"""A fast tier (local disk or EFS) in front of a durable one (S3).

A notice gives 30–120 seconds; a snapshot must land somewhere inside that
budget, and S3 from a busy spot VM may not be fast enough. So every write goes
to the fast tier and is durable there when the call returns; a background
thread then replicates committed snapshots to S3 — each snapshot's blobs first,
its manifest last, so S3 never holds a manifest that names a blob it lacks. A
blob (a chunk of a big buffer, say) starts on its way to S3 as soon as the fast
tier has it, while the snapshot's other blobs are still being written; the
snapshot's replication then waits for those sends instead of starting its own.
Newest snapshots go first: after an interruption the latest state is the one a
restore wants. On a notice, :meth:`TieredStore.flush_replication` waits (up to a
deadline) until S3 has everything. Reads take the nearest tier that has the
data and fall back to S3 when the fast tier lacks it or holds damaged bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..faults import fault_point
from .base import Buffer, Store
from .errors import CorruptBlobError, ManifestError, MissingBlobError, SnapshotExistsError, StoreError

log = logging.getLogger(__name__)

#: At interpreter exit (a kernel shut down by SIGTERM), wait this long for S3
#: to receive what it lacks before the daemon replication thread dies.
EXIT_FLUSH_SECONDS = 30.0


class _Unsendable(StoreError):
    """The fast tier cannot supply a snapshot's bytes; retrying soon will not help."""


class TieredStore(Store):
    """Writes to ``fast``, replicates to ``durable`` in the background, reads nearest first."""

    kind = "tiered"

    def __init__(self, fast: Store, durable: Store, signer: Any = None, upload_workers: int | None = None) -> None:
        super().__init__(f"{durable.url} (via {fast.url})", signer or fast.signer)
        self.fast = fast
        self.durable = durable
        #: (session, snapshot id) → commit order; the highest goes to S3 first.
        self._pending: dict[tuple[str, str], int] = {}
        self._order = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._scanning = True  # until the fast tier was compared with S3 once
        #: Why the last replication attempt failed, if it did; cleared on success.
        self.last_error: str | None = None
        #: Snapshots whose local copy is damaged: retried, but not waited for.
        self._unsendable: set[tuple[str, str]] = set()
        #: Blobs on their way to S3 (at most ``upload_workers`` at a time; the durable tier's
        #: ``blob_workers`` by default): a snapshot's replication joins a send already under way.
        self._sending: dict[str, Future[None]] = {}
        workers = upload_workers or durable.blob_workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="spot-replicate-blob")
        self._worker = threading.Thread(target=self._run, name="spot-replicate", daemon=True)
        self._worker.start()
        # Before concurrent.futures' own exit hook, which would refuse the
        # uploads (s3transfer's too); atexit proper runs too late for that.
        getattr(threading, "_register_atexit", atexit.register)(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        if not self._closed and self.flush_replication(time.time() + EXIT_FLUSH_SECONDS):
            log.warning("jupyter-spot: exiting before S3 has %s", ", ".join(self.pending_snapshots()))

    # -- replication ---------------------------------------------------------
    def _find_unreplicated(self) -> None:
        """Queue snapshots the fast tier has and S3 lacks (left by a previous process)."""
        found: list[tuple[str, str]] = []
        for session in self.fast.list_sessions():
            durable_ids = set(self.durable.list_snapshots(session))
            found += [(session, sid) for sid in self.fast.list_snapshots(session) if sid not in durable_ids]
        with self._cond:
            # Older than anything committed by this process, newest id last.
            for rank, key in enumerate(sorted(found, key=lambda k: k[1])):
                self._pending.setdefault(key, rank - len(found))
            self._cond.notify_all()

    def _replicate(self, session: str, snapshot_id: str) -> None:
        """Send one snapshot's missing blobs, then its manifest."""
        try:
            manifest = self.fast.load_manifest(session, snapshot_id)
        except ManifestError as error:
            if snapshot_id not in self.fast.list_snapshots(session):
                return  # deleted before it was replicated: nothing to send
            raise _Unsendable(str(error)) from error

        # Waits for every send (started here or when the blob was written), then
        # re-raises the first failure; the manifest is then not sent.
        self._await_sends(manifest.get("blobs", []))
        fault_point("replicate")
        try:
            try:
                self.durable.commit_manifest(manifest)
            except MissingBlobError as error:
                # A collection of S3 (from any machine) deleted blobs S3 was
                # believed to hold: send those now rather than after a backoff.
                self._await_sends(error.digests)
                self.durable.commit_manifest(manifest)
        except SnapshotExistsError:
            if self.durable.load_manifest(session, snapshot_id) != manifest:
                log.warning(
                    "snapshot %s of session %r exists in %s with other contents; kept only in %s",
                    snapshot_id,
                    session,
                    self.durable.url,
                    self.fast.url,
                )

    def _send(self, digest: str, ask_first: bool = True) -> Future[None]:
        """Start sending one blob to S3, or join the send of it already under way."""
        with self._cond:
            future = self._sending.get(digest)
            if future is None:
                future = self._pool.submit(self._send_blob, digest, ask_first)
                self._sending[digest] = future
                future.add_done_callback(lambda done: self._sent(digest, done))
        return future

    def _sent(self, digest: str, future: Future[None]) -> None:
        with self._cond:
            if self._sending.get(digest) is future:
                del self._sending[digest]

    def _send_blob(self, digest: str, ask_first: bool) -> None:
        """``ask_first``: look before reading the local copy (free for a blob S3 is known to
        have); a blob the fast tier just took is new to S3 too, and S3's own condition answers."""
        if ask_first and self.durable.has_blob(digest):
            return
        try:
            data = self.fast.get_blob(digest)
        except StoreError as error:
            raise _Unsendable(f"the local copy cannot be read: {error}") from error
        self.durable.put_blob(digest, data)

    def _await_sends(self, digests: list[str]) -> None:
        for future in [self._send(digest) for digest in dict.fromkeys(digests)]:
            future.result()

    def _send_soon(self, digest: str) -> None:
        """Start a blob the fast tier just took on its way to S3. Its failure is only
        remembered by the future: the snapshot's replication sends it again and reports."""
        if self._closed:
            return
        try:
            self._send(digest, ask_first=False)
        except RuntimeError:  # the pool stopped (interpreter exit): the replication sends it
            pass

    def _run(self) -> None:
        try:
            self._find_unreplicated()
        except StoreError as error:
            self.last_error = f"looking for unreplicated snapshots: {error}"
            log.warning("jupyter-spot replication: %s", self.last_error)
        finally:
            with self._cond:
                self._scanning = False
                self._cond.notify_all()
        backoff = 0.5
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = max(self._pending, key=self._pending.__getitem__)
                order = self._pending[key]
            try:
                self._replicate(*key)
            except Exception as error:  # noqa: BLE001 -- StoreError, or a bug: the thread must live on
                if self._closed:
                    return  # close() dropped the sends it waited for
                message = f"replicating snapshot {key[1]} of session {key[0]!r}: {error}"
                log.warning("jupyter-spot replication: %s (retrying)", message)
                with self._cond:
                    self.last_error = message
                    if isinstance(error, _Unsendable) and self._pending.get(key) == order:
                        # Behind the others, so one snapshot whose local copy is
                        # damaged does not hold back the rest, nor a flush.
                        self._pending[key] = min(self._pending.values()) - 1
                        self._unsendable.add(key)
                        self._cond.notify_all()
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            with self._cond:
                self._unsendable.discard(key)
                if not self._unsendable:
                    self.last_error = None
                deleted_meanwhile = key not in self._pending
                if self._pending.get(key) == order:
                    del self._pending[key]
                self._cond.notify_all()
            if deleted_meanwhile:  # delete_snapshot ran while we were sending it
                with contextlib.suppress(ManifestError):
                    self.durable.delete_snapshot(*key)

    def pending_snapshots(self) -> list[str]:
        """``session/id`` of every committed snapshot S3 does not have yet, newest first."""
        with self._cond:
            keys = sorted(self._pending, key=self._pending.__getitem__, reverse=True)
        return [f"{session}/{sid}" for session, sid in keys]

    def flush_replication(self, deadline: float | None = None) -> list[str]:
        """Wait until S3 has every committed snapshot, or until ``deadline``
        (a ``time.time()`` value; None waits as long as it takes).

        Returns what is still missing from S3 (empty: everything is durable);
        the notice handler calls this with the interruption time as deadline.
        Snapshots whose local copy is damaged are not waited for (they can
        only be sent once repaired) but are still listed.
        """
        with self._cond:
            self._cond.notify_all()  # cut a retry backoff short
            while (self._scanning or self._pending.keys() - self._unsendable) and not self._closed:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left if left is None else min(left, 1.0))
        return self.pending_snapshots()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, deadline: float | None = None) -> list[str]:
        """Flush until ``deadline``, then stop: sends not yet begun are dropped (with S3
        down each would retry for seconds), the ones under way finish or fail."""
        missing = self.flush_replication(deadline)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._worker.join()
        self._pool.shutdown()
        return missing

    # -- blobs ---------------------------------------------------------------
    def _durable(self, default: Any, method: str, *args: Any) -> Any:
        """Ask the durable tier, but let an S3 outage leave reads to the fast tier."""
        try:
            return getattr(self.durable, method)(*args)
        except StoreError as error:
            log.warning("jupyter-spot: %s unavailable, using %s only: %s", self.durable.url, self.fast.url, error)
            return default

    def has_blob(self, digest: str) -> bool:
        return self.fast.has_blob(digest) or self._durable(False, "has_blob", digest)

    def put_blob(self, digest: str, data: Buffer) -> int:
        written = self.fast.put_blob(digest, data)
        if written:
            self._send_soon(digest)
        return written

    def add_blob(self, data: Buffer) -> tuple[str, int]:
        digest, written = self.fast.add_blob(data)
        if written:
            self._send_soon(digest)
        return digest, written

    def add_blobs(
        self,
        blobs: Sequence[Buffer],
        added: Callable[[int, str, int], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        def fast_added(index: int, digest: str, written: int) -> None:
            if written:
                self._send_soon(digest)
            added(index, digest, written)

        self.fast.add_blobs(blobs, fast_added, stop)

    @property
    def blob_workers(self) -> int:  # type: ignore[override]
        """Writes go to the fast tier, so its parallelism is ours."""
        return self.fast.blob_workers

    def get_blob(self, digest: str) -> Buffer:
        try:
            return self.fast.get_blob(digest)
        except (MissingBlobError, CorruptBlobError) as error:
            log.debug("blob %s from %s instead: %s", digest[:12], self.durable.url, error)
        return self.durable.get_blob(digest)

    def read_blob_into(self, digest: str, out: memoryview) -> None:
        try:
            self.fast.read_blob_into(digest, out)
            return
        except (MissingBlobError, CorruptBlobError) as error:
            log.debug("blob %s from %s instead: %s", digest[:12], self.durable.url, error)
        self.durable.read_blob_into(digest, out)

    def iter_blobs(self) -> Iterator[str]:
        seen = set(self.fast.iter_blobs())
        yield from seen
        yield from (digest for digest in self.durable.iter_blobs() if digest not in seen)

    def blob_age(self, digest: str) -> float:
        return min(self.fast.blob_age(digest), self.durable.blob_age(digest))

    def delete_blob(self, digest: str) -> None:
        self.fast.delete_blob(digest)
        self.durable.delete_blob(digest)

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """A commit lands in the fast tier, and replication sends from there."""
        return self.fast.missing_blobs(digests)

    def collection_generation(self) -> str | None:
        """The fast tier's: writes land there (replication checks S3 on its own)."""
        return self.fast.collection_generation()

    def announce_collection(self) -> None:
        self.durable.announce_collection()
        self.fast.announce_collection()

    @contextlib.contextmanager
    def blob_gc_guard(self) -> Iterator[Callable[[], bool]]:
        """The durable tier's collector lock, if it has one (see retention)."""
        guard = getattr(self.durable, "blob_gc_guard", None)
        with guard() if guard else contextlib.nullcontext(lambda: True) as may_delete:
            yield may_delete

    # -- manifests -----------------------------------------------------------
    def _write_manifest(self, session: str, snapshot_id: str, data: bytes) -> None:
        self.fast._write_manifest(session, snapshot_id, data)
        with self._cond:
            self._pending[(session, snapshot_id)] = next(self._order)
            self._cond.notify_all()

    def _read_manifest(self, session: str, snapshot_id: str) -> bytes:
        try:
            return self.fast._read_manifest(session, snapshot_id)
        except ManifestError:
            return self.durable._read_manifest(session, snapshot_id)

    def list_sessions(self) -> list[str]:
        return sorted(set(self.fast.list_sessions()) | set(self._durable([], "list_sessions")))

    def list_snapshots(self, session: str) -> list[str]:
        return sorted(set(self.fast.list_snapshots(session)) | set(self._durable([], "list_snapshots", session)))

    def delete_snapshot(self, session: str, snapshot_id: str) -> None:
        with self._cond:
            self._pending.pop((session, snapshot_id), None)
            self._unsendable.discard((session, snapshot_id))
        deleted = False
        for tier in (self.fast, self.durable):
            try:
                tier.delete_snapshot(session, snapshot_id)
                deleted = True
            except ManifestError:
                pass
        if not deleted:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist")

    # -- records: small, so written through to both tiers --------------------
    def put_record(self, name: str, data: dict[str, Any]) -> None:
        self.fast.put_record(name, data)
        self.durable.put_record(name, data)

    def get_record(self, name: str) -> dict[str, Any] | None:
        record = self.fast.get_record(name)
        return record if record is not None else self._durable(None, "get_record", name)

    def list_records(self) -> list[str]:
        return sorted(set(self.fast.list_records()) | set(self._durable([], "list_records")))

    # -- health --------------------------------------------------------------
    # Signing keys live with the durable copy, which every machine sees.
    def create_key_object(self, name: str, data: bytes) -> bool:
        return self.durable.create_key_object(name, data)

    def read_key_object(self, name: str) -> bytes | None:
        return self.durable.read_key_object(name)

    def list_key_objects(self) -> list[str]:
        return self.durable.list_key_objects()

    def check_writable(self) -> None:
        self.fast.check_writable()
        self.durable.check_writable()
