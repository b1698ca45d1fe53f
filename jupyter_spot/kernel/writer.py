"""The one thread that writes blobs (with helpers) and commits manifests, in snapshot order.

A snapshot's manifest is committed only after every blob it names is durable,
so a kernel killed mid-write leaves the previous snapshot as the latest one —
never a manifest pointing at missing bytes. Snapshots are committed in the
order they were taken, each naming the one before as its parent.

A garbage collection may delete a blob this kernel believes stored; the
store's commit then refuses the manifest (MissingBlobError) and the writer
stores those blobs again from the bytes the snapshot pickled, and commits.

The main thread never blocks on a lock this thread holds for long and never
waits under one: :meth:`wait` polls, so ``flush()`` can run from a signal
handler that interrupted the main thread anywhere.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..store import MissingBlobError, Store, StoreError
from .identity import content_key
from .results import SnapshotResult

#: Commits tried per snapshot when collections keep deleting blobs it relies on.
COMMIT_ATTEMPTS = 3

ABANDONED = ("the deadline passed before the snapshot was durable; it was abandoned, as the cell went on "
             "changing what it had still to write (the next snapshot writes what it lacked)")


@dataclass
class Job:
    """One snapshot on its way to the store."""

    result: SnapshotResult
    blobs: list[tuple[str, Any]]  # (content key, bytes-like) not yet known durable
    build_manifest: Callable[[dict[str, str]], dict[str, Any]]  # content key → sha256 resolved
    #: The other bytes this snapshot pickled (believed stored already, or written by an
    #: earlier snapshot): what it stores again if a collection deleted them meanwhile.
    spare: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    remaining: int = 0
    #: Set by a newer snapshot that goes first (a notice's flush): write no more, never commit.
    superseded: bool = False
    #: Its blobs are the kernel's live memory, not copies: only safe to read while the main thread waits.
    live: bool = False
    #: Set when the main thread stopped waiting (a deadline passed) and may change that memory:
    #: write no more, believe nothing stored from now on, never commit.
    abandoned: bool = False
    #: Every blob is stored and the manifest is being committed: too late to abandon.
    committing: bool = False
    #: A blob's bytes no longer matched the content key it was taken under (another thread
    #: changed them): the snapshot is not committed, and those bytes are not believed stored.
    changed: bool = False

    @property
    def nbytes(self) -> int:
        return sum(memoryview(data).nbytes for _, data in self.blobs)


class Writer:
    """Writes queued snapshots in a daemon thread."""

    def __init__(
        self, store: Store, durable: dict[str, str], on_commit: Callable[[dict[str, Any]], None], parent: str | None
    ) -> None:
        self.store = store
        self.durable = durable  # content key → sha256 of blobs known to be in the store
        self.on_commit = on_commit
        self.last_committed = parent
        self._queue: collections.deque[Job] = collections.deque()
        self._wake = threading.Event()
        self._counts = threading.Lock()
        self._outstanding = 0
        self.pending_blobs = 0
        self.pending_bytes = 0
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        job.remaining = len(job.blobs)
        job.result.bytes_pending = job.nbytes
        with self._counts:
            self._outstanding += 1
            self.pending_blobs += job.remaining
            self.pending_bytes += job.result.bytes_pending
        self._queue.append(job)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="jupyter-spot-writer", daemon=True)
            self._thread.start()
        self._wake.set()

    @property
    def pending_snapshots(self) -> int:
        """Snapshots queued or being written, counted until their manifest is committed."""
        return self._outstanding

    @property
    def idle(self) -> bool:
        return self._outstanding == 0

    def abandon(self, job: Job) -> bool:
        """The main thread stops waiting for ``job`` and goes on changing the memory it reads.

        A blob finished after this may hold bytes from after the change, stored under
        a content key computed before it; believing it stored would let a later
        snapshot of that very content name the wrong bytes. So the job writes no more,
        records nothing more and never commits. False if it was already committing
        (every blob was read while the main thread still waited) or done.
        """
        with self._counts:
            if job.committing or job.done.is_set():
                return False
            job.abandoned = True
            return True

    def wait(self, job: Job | None = None, deadline: float | None = None) -> bool:
        """Until ``job`` (or every queued job) is finished; False on timeout."""
        delay = 0.0005
        while not (job.done.is_set() if job is not None else self.idle):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                job = self._queue.popleft()
                committed = None
                try:
                    committed = self._write(job)
                finally:
                    self._settle(job, job.remaining, job.result.bytes_pending)
                    job.blobs, job.spare = [], {}  # let go of copied buffers
                    with self._counts:
                        self._outstanding -= 1
                    job.done.set()
                if committed is not None:
                    self._after_commit(committed)

    def _after_commit(self, manifest: dict[str, Any]) -> None:
        """``on_commit`` (retention) once the job is done: a waiter (a notice's flush) must not
        wait for housekeeping that may ask a slow S3 (a tiered store lists both tiers)."""
        try:
            self.on_commit(manifest)
        except Exception as error:
            self.last_error = f"after committing {manifest['id']}: {type(error).__name__}: {error}"

    def _settle(self, job: Job, blobs: int, nbytes: int) -> None:
        with self._counts:
            job.remaining -= blobs
            job.result.bytes_pending -= nbytes
            self.pending_blobs -= blobs
            self.pending_bytes -= nbytes

    def _store(self, job: Job, blobs: list[tuple[str, memoryview]]) -> None:
        """Store new blobs (the store decides how many at once); raise the first failure.

        Stops starting more once the job was superseded or abandoned.
        """

        def added(index: int, digest: str, written: int) -> None:
            key, view = blobs[index]
            # The key was computed when the snapshot was prepared; a thread of the user's may
            # have changed the bytes since. Stored under the key, they would be what every
            # later chunk with the old content names (xxh3: ~35 ms per GB).
            intact = content_key(view) == key
            with self._counts:
                if job.abandoned:
                    return  # maybe read after the main thread went on: see abandon()
                if not intact:
                    job.changed = True
                    return
                job.result.bytes_written += written
                self.durable[key] = digest
            self._settle(job, 1, view.nbytes)

        self.store.add_blobs([view for _, view in blobs], added,
                             stop=lambda: job.superseded or job.abandoned or job.changed)

    def _commit(self, job: Job, manifest: dict[str, Any]) -> None:
        """Commit, storing again any blob a collection deleted since it was believed stored."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                self.store.commit_manifest(manifest)
                return
            except MissingBlobError as error:
                if attempt == COMMIT_ATTEMPTS or not self._store_again(job, error.digests):
                    raise

    def _store_again(self, job: Job, digests: list[str]) -> bool:
        """Store the blobs ``digests`` from the bytes ``job`` holds; False if it lacks some.

        A value the job did not pickle (unchanged since an earlier snapshot) is
        forgotten instead, so the next snapshot pickles and stores it again.
        """
        gone = set(digests)
        keys = {digest: key for key, digest in list(self.durable.items()) if digest in gone}
        held = {**job.spare, **dict(job.blobs)}
        lacking = [digest for digest in gone if keys.get(digest) not in held]
        if lacking:
            for digest in lacking:
                self.durable.pop(keys.get(digest, ""), None)
            return False
        for digest in gone:
            job.result.bytes_written += self.store.put_blob(digest, held[keys[digest]])
        return True

    def _write(self, job: Job) -> dict[str, Any] | None:
        """Store the job's new blobs, then commit its manifest; the manifest, if committed."""
        result = job.result
        try:
            new = []
            for key, data in job.blobs:
                if key in self.durable:
                    self._settle(job, 1, memoryview(data).nbytes)
                else:
                    new.append((key, memoryview(data)))
            self._store(job, new)
            with self._counts:
                job.committing = not (job.superseded or job.abandoned or job.changed)
            if job.superseded:
                result.error = "superseded: a notice's flush wrote a newer snapshot first"
                return None
            if job.abandoned:
                result.error = ABANDONED
                return None
            if job.changed:
                result.error = ("an array changed while it was being written (by another thread?): this snapshot "
                                "was not committed; the next one stores it again")
                return None
            try:
                manifest = job.build_manifest(self.durable)
            except KeyError:  # an earlier snapshot found a blob it relied on gone, and could not repair it
                raise MissingBlobError("a blob this snapshot relies on was collected; the next snapshot writes it again")
            manifest["parent"] = self.last_committed
            self._commit(job, manifest)
        except StoreError as error:
            result.error = str(error)
            self.last_error = result.error
        except Exception as error:  # never let the writer thread die silently
            result.error = f"{type(error).__name__}: {error}"
            self.last_error = result.error
        else:
            self.last_committed = manifest["id"]
            result.durable = True
            self.last_error = None
            return manifest
        finally:
            result.seconds = time.perf_counter() - job.started
