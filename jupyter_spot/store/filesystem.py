"""Snapshots as plain files: a local disk or an NFS/EFS mount.

Only operations that are atomic on NFS are used: write a temporary file in the
target directory, fsync it, then ``rename`` (blobs, records) or ``link``
(manifests, so a commit never replaces another writer's). No SQLite, no locks.

Layout under the root::

    blobs/ab/abcdef…            content-addressed bytes
    sessions/<session>/<id>.json one signed manifest per snapshot
    records/<name>.json          the server's records
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import (
    Buffer,
    CorruptBlobError,
    ManifestError,
    MissingBlobError,
    SnapshotExistsError,
    Store,
    StoreError,
    check_digest,
    check_record_name,
    check_snapshot_id,
    decode_session,
    digest_of,
    encode_session,
)

#: Blobs at least this big are read through a copy-on-write mmap: no copy up
#: front, pages come in as the unpickler touches them, and arrays stay writable.
MMAP_THRESHOLD = 1 << 20


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some NFS clients refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _write_durably(target: Path, data: Buffer) -> Path:
    """Write ``data`` to a fresh temporary file beside ``target``; fsynced."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


class FileStore(Store):
    """A store in a directory."""

    kind = "local"

    def __init__(self, root: str | os.PathLike[str], signer: Any = None) -> None:
        self.root = Path(root).expanduser().resolve()
        super().__init__(str(self.root), signer)
        self._known_dirs: set[Path] = set()

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

    def put_blob(self, digest: str, data: Buffer) -> int:
        path = self._blob_path(digest)
        size = memoryview(data).nbytes
        try:
            if path.stat().st_size == size:
                os.utime(path)  # tells a concurrent GC this blob is in use again
                return 0
        except FileNotFoundError:
            pass
        except OSError as error:  # e.g. ENOTDIR: the store's path runs through a regular file
            raise self._wrap(error, f"writing blob {digest[:12]}") from error
        self._ensure_dir(path.parent)
        try:
            tmp = _write_durably(path, data)
            os.replace(tmp, path)
        except OSError as error:
            raise self._wrap(error, f"writing blob {digest[:12]}") from error
        _fsync_dir(path.parent)
        return size

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

    def delete_blob(self, digest: str) -> None:
        self._blob_path(digest).unlink(missing_ok=True)

    # -- manifests -----------------------------------------------------------
    def _session_dir(self, session: str) -> Path:
        return self.root / "sessions" / encode_session(session)

    def _manifest_path(self, session: str, snapshot_id: str) -> Path:
        return self._session_dir(session) / f"{check_snapshot_id(snapshot_id)}.json"

    def _write_manifest(self, session: str, snapshot_id: str, data: bytes) -> None:
        path = self._manifest_path(session, snapshot_id)
        self._ensure_dir(path.parent)
        try:
            tmp = _write_durably(path, data)
        except OSError as error:
            raise self._wrap(error, f"committing snapshot {snapshot_id}") from error
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise SnapshotExistsError(f"snapshot {snapshot_id} of session {session!r} already exists") from None
        except OSError as error:
            raise self._wrap(error, f"committing snapshot {snapshot_id}") from error
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def _read_manifest(self, session: str, snapshot_id: str) -> bytes:
        path = self._manifest_path(session, snapshot_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist") from None
        except OSError as error:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r}: {error.strerror}") from error

    def list_sessions(self) -> list[str]:
        base = self.root / "sessions"
        if not base.is_dir():
            return []
        return sorted(
            decode_session(path.name)
            for path in base.iterdir()
            if path.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".") for p in path.iterdir())
        )

    def list_snapshots(self, session: str) -> list[str]:
        directory = self._session_dir(session)
        if not directory.is_dir():
            return []
        return sorted(
            path.stem for path in directory.iterdir() if path.suffix == ".json" and not path.name.startswith(".")
        )

    def delete_snapshot(self, session: str, snapshot_id: str) -> None:
        path = self._manifest_path(session, snapshot_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist") from None
        _fsync_dir(path.parent)

    # -- records -------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        return self.root / "records" / f"{check_record_name(name)}.json"

    def put_record(self, name: str, data: dict[str, Any]) -> None:
        path = self._record_path(name)
        self._ensure_dir(path.parent)
        try:
            tmp = _write_durably(path, json.dumps(data, indent=1, sort_keys=True).encode())
            os.replace(tmp, path)
        except OSError as error:
            raise self._wrap(error, f"writing record {name}") from error
        _fsync_dir(path.parent)

    def get_record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(name).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise StoreError(f"record {name} in {self.root} is not valid JSON ({error})") from None

    def list_records(self) -> list[str]:
        base = self.root / "records"
        if not base.is_dir():
            return []
        return sorted(p.stem for p in base.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    # -- health --------------------------------------------------------------
    def check_writable(self) -> None:
        self._known_dirs.discard(self.root)
        self._ensure_dir(self.root)
        probe = self.root / f".probe-{secrets.token_hex(4)}"
        try:
            tmp = _write_durably(probe, b"ok")
            tmp.unlink()
        except OSError as error:
            raise self._wrap(error, "checking that it is writable") from error
