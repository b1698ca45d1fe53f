"""Snapshots as plain files: a local disk or an NFS/EFS mount.

Only operations that are atomic on NFS are used: write a temporary file in the
target directory, fsync it, then ``rename`` (blobs, records) or ``link``
(manifests, so a commit never replaces another writer's). No SQLite, no locks.
A blob is hashed while it is written, so its temporary file is staged in
``blobs/`` and renamed into its shard once its address is known. This module
keeps the blobs; manifests, records and keys are in file_documents.py.

Layout under the root::

    blobs/ab/abcdef…            content-addressed bytes
    blobs/.<random>.tmp          a blob being written (never listed as a blob)
    sessions/<session>/<id>.json one signed manifest per snapshot
    sessions/<long…%~hash>/      a session whose encoded name is over 255 bytes,
        session-name             with its real name beside its manifests
    records/<name>.json          the server's records
    locks/gc-generation          rewritten before a collection deletes its first blob

A blob file of the right size is not trusted until this process wrote it (or
wrote it again): bytes damaged on disk must never pass for "already stored".
A commit checks that every blob it names exists, unless this process wrote or
checked it since the last collection; a collection that begins between that
check and the manifest write changes the generation, and the commit checks
again (Store.commit_manifest). There are no leases here: a collection already
deleting when a commit starts is kept off its blobs by their age — blobs written
or checked (``utime``) recently are spared, the age re-read just before each
deletion — so only with a grace period of 0 can it still take one.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..faults import fault_point
from ..threads import run_in_threads
from . import file_writes
from .base import Buffer, Store, biggest_first, check_digest, digest_of
from .errors import CorruptBlobError, MissingBlobError, StoreError
from .file_documents import FileDocuments

#: Blobs at least this big are read through a copy-on-write mmap: no copy up
#: front, pages come in as the unpickler touches them, and arrays stay writable.
MMAP_THRESHOLD = 1 << 20

#: :meth:`FileStore.add_blobs` writes this many blobs before it fsyncs them: the
#: disk takes most of a batch while the rest is written, and the fsyncs share
#: journal commits. It bounds the files held open at once.
SYNC_BATCH = 64


class FileStore(FileDocuments, Store):
    """A store in a directory."""

    kind = "local"
    #: Chunked buffers make a snapshot many blobs, each waiting on its own fsync;
    #: four in flight overlap those waits. Measured (1 GiB as 4 MiB chunks, best of
    #: 3, interleaved, 2 vCPUs): 1.67-1.81 s with four, 2.11-2.25 s with two. A few
    #: big blobs are unaffected: no more are stored at once than there are blobs.
    blob_workers = 4

    def __init__(self, root: str | os.PathLike[str], signer: Any = None) -> None:
        self.root = Path(root).expanduser().resolve()
        super().__init__(str(self.root), signer)
        self._known_dirs: set[Path] = set()
        #: Blobs whose bytes this process wrote: sound unless damaged since (checked once per process).
        self._verified: set[str] = set()
        #: Blobs this process wrote or saw exist since the collection generation ``_present_since``.
        self._present: set[str] = set()
        self._present_since: str | None = None
        self._generation_path = self.root / "locks" / "gc-generation"

    def _ensure_dir(self, path: Path) -> None:
        if path in self._known_dirs:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {path}: {error.strerror}") from error
        self._known_dirs.add(path)

    def _wrap(self, error: OSError, what: str) -> StoreError:
        reason = error.strerror or str(error)
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StoreError(f"store {self.root} is not writable ({reason}) while {what}")
        if error.errno == errno.ENOSPC:
            return StoreError(f"store {self.root} is full ({reason}) while {what}")
        return StoreError(f"store {self.root}: {reason} while {what}")

    # -- blobs ---------------------------------------------------------------
    def _blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "blobs" / digest[:2] / digest

    def has_blob(self, digest: str) -> bool:
        return self._blob_path(digest).is_file()

    def blob_file(self, digest: str) -> Path:
        """Where the blob's bytes lie, for a reader that maps them (a restore); read it only through a check."""
        return self._blob_path(digest)

    def put_blob(self, digest: str, data: Buffer) -> int:
        """Store ``data``, refusing it (CorruptBlobError) if it does not hash to ``digest``."""
        if self._already_stored(self._blob_path(digest), memoryview(data).nbytes):
            return 0
        return self._write_blob(data, expected=digest)[1]

    def add_blob(self, data: Buffer) -> tuple[str, int]:
        return self._write_blob(data)

    def add_blobs(
        self,
        blobs: Sequence[Buffer],
        added: Callable[[int, str, int], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Like :meth:`add_blob` for each, but ``SYNC_BATCH`` at a time: write every blob
        of a batch to its temporary file, then fsync them all, then give each its address.

        Each blob is still fsynced before its rename, and its shard after; only the
        order changes. An fsync right after each write waited on that file alone,
        once per 4 MiB chunk: 1 GiB as 256 chunks took 0.9-1.3 s against 0.7 s for
        one file; in batches, 0.6-0.8 s (benchmarks/README.md).
        """
        order = biggest_first(blobs)
        for start in range(0, len(order), SYNC_BATCH):
            if stop():
                return
            self._add_batch(blobs, order[start : start + SYNC_BATCH], added, stop)

    def _add_batch(
        self, blobs: Sequence[Buffer], batch: list[int], added: Callable[[int, str, int], None], stop: Callable[[], bool]
    ) -> None:
        staging = self.root / "blobs"
        self._ensure_dir(staging)
        staged: dict[int, tuple[int, Path, str]] = {}  # index -> (open file, temporary path, digest)
        lock = threading.Lock()

        def stage(index: int) -> None:
            view = memoryview(blobs[index]).cast("B")
            tmp = staging / f".{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as error:
                raise self._wrap(error, f"writing a blob of {view.nbytes} bytes") from error
            with lock:
                staged[index] = (fd, tmp, "")
            try:
                digest = file_writes.sha256_during(view, lambda: file_writes.write_all(fd, view))
            except OSError as error:
                raise self._wrap(error, f"writing a blob of {view.nbytes} bytes") from error
            if self._already_stored(self._blob_path(digest), view.nbytes):
                with lock:
                    del staged[index]
                os.close(fd)
                tmp.unlink(missing_ok=True)
                added(index, digest, 0)
                return
            fault_point("blob-write")
            with lock:
                staged[index] = (fd, tmp, digest)

        try:
            run_in_threads(stage, batch, self.blob_workers, "jupyter-spot-blob", stop)
            if stop():
                return
            run_in_threads(lambda index: os.fsync(staged[index][0]), list(staged), self.blob_workers,
                           "jupyter-spot-fsync")
            shards = set()
            for _, tmp, digest in staged.values():
                path = self._blob_path(digest)
                self._ensure_dir(path.parent)
                os.replace(tmp, path)
                shards.add(path.parent)
            for shard in shards:
                file_writes.fsync_dir(shard)
        except OSError as error:
            raise self._wrap(error, f"writing {len(batch)} blobs") from error
        finally:
            for fd, tmp, _ in staged.values():
                os.close(fd)
                tmp.unlink(missing_ok=True)  # gone already once renamed
        for index, (_, _, digest) in staged.items():
            self._verified.add(digest)
            self._present.add(digest)
            added(index, digest, memoryview(blobs[index]).nbytes)

    def _already_stored(self, path: Path, size: int) -> bool:
        """Whether the blob at ``path`` is stored already; if so, mark it used.

        Only a blob this process wrote counts: a file of the right size left by
        another may hold damaged bytes, so it is written again (through a
        temporary file and a rename) the first time — which costs an fsync,
        measured cheaper than reading it back to hash it (benchmarks/README.md).
        """
        if path.name not in self._verified:
            return False
        try:
            if path.stat().st_size == size:
                os.utime(path)  # tells a concurrent GC this blob is in use again
                self._present.add(path.name)
                return True
        except FileNotFoundError:
            pass
        except OSError as error:  # e.g. ENOTDIR: the store's path runs through a regular file
            raise self._wrap(error, f"writing blob {path.name[:12]}") from error
        return False

    def _write_blob(self, data: Buffer, expected: str | None = None) -> tuple[str, int]:
        """Write ``data`` to a temporary file while hashing it, and give the file its
        address only once every byte is written, the hash matches ``expected`` (when
        given) and the file is fsynced. (digest, bytes written) like :meth:`add_blob`.

        The temporary file sits in ``blobs/`` because the shard is known only at
        the end; fsyncing the shard after the rename makes the name durable (the
        rename is one journalled operation; on NFS the server commits it).
        """
        view = memoryview(data).cast("B")
        staging = self.root / "blobs"
        self._ensure_dir(staging)
        tmp = staging / f".{secrets.token_hex(8)}.tmp"
        what = f"writing blob {expected[:12]}" if expected else f"writing a blob of {view.nbytes} bytes"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                digest = file_writes.sha256_during(view, lambda: file_writes.write_all(fd, view))
                if expected is not None and digest != expected:
                    raise CorruptBlobError(f"blob {expected[:12]} not stored: the bytes given hash to {digest[:12]}")
                path = self._blob_path(digest)
                if self._already_stored(path, view.nbytes):
                    return digest, 0  # this copy goes; the finally below removes it
                fault_point("blob-write")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._ensure_dir(path.parent)
            os.replace(tmp, path)
        except OSError as error:
            raise self._wrap(error, what) from error
        finally:
            tmp.unlink(missing_ok=True)  # gone already once renamed
        file_writes.fsync_dir(path.parent)
        self._verified.add(digest)
        self._present.add(digest)
        return digest, view.nbytes

    def get_blob(self, digest: str) -> Buffer:
        path = self._blob_path(digest)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size >= MMAP_THRESHOLD:
                    data: Buffer = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))
                else:
                    data = bytearray(handle.read())
        except FileNotFoundError:
            raise MissingBlobError(f"blob {digest[:12]} is missing from {self.root}") from None
        except OSError as error:
            raise self._wrap(error, f"reading blob {digest[:12]}") from error
        if digest_of(data) != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.root} is corrupt (its checksum does not match)")
        return data

    def read_blob_into(self, digest: str, out: memoryview) -> None:
        """Read the blob straight into ``out`` (``readinto``: no copy in between), then verify those bytes.

        A kernel's restore maps chunk files in place instead where it can (kernel/chunks.py).
        """
        path = self._blob_path(digest)
        view = out.cast("B") if out.format != "B" else out
        try:
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                got = 0
                if size == view.nbytes:
                    while got < size:
                        count = handle.readinto(view[got:])
                        if not count:
                            break
                        got += count
        except FileNotFoundError:
            raise MissingBlobError(f"blob {digest[:12]} is missing from {self.root}") from None
        except OSError as error:
            raise self._wrap(error, f"reading blob {digest[:12]}") from error
        if size != view.nbytes or got != size:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.root} holds {size} bytes, not the {view.nbytes} "
                                   "its snapshot names")
        if digest_of(view) != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.root} is corrupt (its checksum does not match)")

    def iter_blobs(self) -> Iterator[str]:
        base = self.root / "blobs"
        if not base.is_dir():
            return
        for shard in sorted(base.iterdir()):
            if shard.is_dir():
                for path in shard.iterdir():
                    if not path.name.startswith("."):
                        yield path.name

    def blob_age(self, digest: str) -> float:
        """Seconds since the blob was last written or re-used."""
        import time

        try:
            return time.time() - self._blob_path(digest).stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Delete ``.*.tmp`` files a killed writer left behind (older than ``older_than`` seconds)."""
        import time

        removed = 0
        cutoff = time.time() - older_than
        for path in self.root.rglob(".*.tmp"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished (renamed it) or another GC took it
                continue
            except OSError as error:
                raise self._wrap(error, f"removing {path.name}") from error
        return removed

    def delete_blob(self, digest: str) -> None:
        self._present.discard(digest)
        self._blob_path(digest).unlink(missing_ok=True)

    def collection_generation(self) -> str | None:
        try:
            return self._generation_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._wrap(error, "reading the garbage collection generation") from error

    def announce_collection(self) -> None:
        self._ensure_dir(self._generation_path.parent)
        try:
            tmp = file_writes.write_durably(self._generation_path, secrets.token_hex(8).encode())
            os.replace(tmp, self._generation_path)
        except OSError as error:
            raise self._wrap(error, "announcing a garbage collection") from error
        file_writes.fsync_dir(self._generation_path.parent)

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """Which of ``digests`` are gone: one ``utime`` for each blob not written or
        seen since the last collection, which also tells a running collector it is in use."""
        generation = self.collection_generation()
        if generation != self._present_since:
            self._present.clear()
            self._present_since = generation
        missing = []
        for digest in dict.fromkeys(digests):
            if digest in self._present:
                continue
            try:
                os.utime(self._blob_path(digest))
            except FileNotFoundError:
                missing.append(digest)
                continue
            except OSError as error:
                raise self._wrap(error, f"checking blob {digest[:12]}") from error
            self._present.add(digest)
        return missing

    # -- health --------------------------------------------------------------
    def missing_reason(self) -> str | None:
        """Only reads: the store's directory is made by its first write, so its absence is
        news, not an error; a path through a regular file can never hold one."""
        try:
            for path in (self.root, *self.root.parents):
                if path.is_dir():
                    return None if path == self.root else f"{self.root} does not exist"
                if path.exists():
                    raise StoreError(f"store {self.root} cannot be made: {path} is a file, not a directory")
        except OSError:
            return None  # a parent we may not look into: the listing's own errors say more
        return f"{self.root} does not exist"

    def check_writable(self) -> None:
        self._known_dirs.discard(self.root)
        self._ensure_dir(self.root)
        probe = self.root / f".probe-{secrets.token_hex(4)}"
        try:
            tmp = file_writes.write_durably(probe, b"ok")
            tmp.unlink()
        except OSError as error:
            raise self._wrap(error, "checking that it is writable") from error
