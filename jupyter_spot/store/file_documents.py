"""A FileStore's documents: signed manifests in session folders, the server's
records and the signing keys — small files beside the blobs (filesystem.py).

Each is written to a temporary file, fsynced, then given its name with ``link``
(a manifest or a key: a commit never replaces another writer's) or ``rename``
(a record), and its directory is fsynced: atomic on NFS too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import file_writes
from .base import (
    MAX_RECORD_BYTES,
    SESSION_NAME_FILE,
    check_record_name,
    check_snapshot_id,
    decode_session,
    encode_session,
    hashed_session_name,
    is_hashed_session,
    parse_record,
    report_bad_record,
)
from .errors import ManifestError, SnapshotExistsError

if TYPE_CHECKING:
    from .filesystem import FileStore


class FileDocuments:
    """The manifest, record and key half of :class:`~jupyter_spot.store.filesystem.FileStore`."""

    # -- manifests -----------------------------------------------------------
    def _session_dir(self: FileStore, session: str) -> Path:
        return self.root / "sessions" / encode_session(session)

    def _manifest_path(self: FileStore, session: str, snapshot_id: str) -> Path:
        return self._session_dir(session) / f"{check_snapshot_id(snapshot_id)}.json"

    def _write_manifest(self: FileStore, session: str, snapshot_id: str, data: bytes) -> None:
        path = self._manifest_path(session, snapshot_id)
        self._ensure_dir(path.parent)
        if is_hashed_session(path.parent.name):
            self._keep_session_name(path.parent, session)
        if not self._create(path, data, f"committing snapshot {snapshot_id}"):
            raise SnapshotExistsError(f"snapshot {snapshot_id} of session {session!r} already exists")

    def _create(self: FileStore, path: Path, data: bytes, what: str) -> bool:
        """Write ``path`` durably unless it exists (False then): ``link`` creates atomically, also on NFS,
        and never replaces another writer's file."""
        try:
            tmp = file_writes.write_durably(path, data)
        except OSError as error:
            raise self._wrap(error, what) from error
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as error:
            raise self._wrap(error, what) from error
        finally:
            tmp.unlink(missing_ok=True)
        file_writes.fsync_dir(path.parent)
        return True

    def _read_manifest(self: FileStore, session: str, snapshot_id: str) -> bytes:
        path = self._manifest_path(session, snapshot_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist") from None
        except OSError as error:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r}: {error.strerror}") from error

    def _keep_session_name(self: FileStore, folder: Path, session: str) -> None:
        """A long name's folder is named by its hash: keep the name itself in it (once)."""
        target = folder / SESSION_NAME_FILE
        if target.is_file():
            return
        try:
            os.replace(file_writes.write_durably(target, session.encode()), target)
        except OSError as error:
            raise self._wrap(error, f"naming session {session!r}") from error

    def _session_name(self: FileStore, folder: Path) -> str | None:
        if not is_hashed_session(folder.name):
            return decode_session(folder.name)
        try:
            with open(folder / SESSION_NAME_FILE, "rb") as handle:
                data = handle.read(8192)
        except OSError:
            data = b""
        return hashed_session_name(str(self.root), folder.name, data)

    def list_sessions(self: FileStore) -> list[str]:
        base = self.root / "sessions"
        if not base.is_dir():
            return []
        folders = [
            path
            for path in base.iterdir()
            if path.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".") for p in path.iterdir())
        ]
        return sorted(name for name in map(self._session_name, folders) if name is not None)

    def list_snapshots(self: FileStore, session: str) -> list[str]:
        directory = self._session_dir(session)
        if not directory.is_dir():
            return []
        return sorted(
            path.stem for path in directory.iterdir() if path.suffix == ".json" and not path.name.startswith(".")
        )

    def delete_snapshot(self: FileStore, session: str, snapshot_id: str) -> None:
        path = self._manifest_path(session, snapshot_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ManifestError(f"snapshot {snapshot_id} of session {session!r} does not exist") from None
        file_writes.fsync_dir(path.parent)

    # -- records -------------------------------------------------------------
    def _record_path(self: FileStore, name: str) -> Path:
        return self.root / "records" / f"{check_record_name(name)}.json"

    def put_record(self: FileStore, name: str, data: dict[str, Any]) -> None:
        path = self._record_path(name)
        self._ensure_dir(path.parent)
        try:
            tmp = file_writes.write_durably(path, json.dumps(data, indent=1, sort_keys=True).encode())
            os.replace(tmp, path)
        except OSError as error:
            raise self._wrap(error, f"writing record {name}") from error
        file_writes.fsync_dir(path.parent)

    def get_record(self: FileStore, name: str) -> dict[str, Any] | None:
        try:
            with open(self._record_path(name), "rb") as handle:
                data = handle.read(MAX_RECORD_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: the store's path runs through a file, so
            return None  # nothing was ever stored there; writes say so (the store is read-only)
        except OSError as error:
            raise self._wrap(error, f"reading record {name}") from error
        if len(data) > MAX_RECORD_BYTES:
            report_bad_record(str(self.root), name, f"it is larger than {MAX_RECORD_BYTES} bytes")
            return None
        return parse_record(str(self.root), name, data)

    def list_records(self: FileStore) -> list[str]:
        base = self.root / "records"
        if not base.is_dir():
            return []
        return sorted(p.stem for p in base.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    # -- signing keys (keys.py) --------------------------------------------------
    def _key_object_path(self: FileStore, name: str) -> Path:
        return self.root / "keys" / f"{check_record_name(name)}.json"

    def create_key_object(self: FileStore, name: str, data: bytes) -> bool:
        path = self._key_object_path(name)
        self._ensure_dir(path.parent)
        return self._create(path, data, f"creating signing key {name}")

    def read_key_object(self: FileStore, name: str) -> bytes | None:
        try:
            return self._key_object_path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._wrap(error, f"reading signing key {name}") from error

    def list_key_objects(self: FileStore) -> list[str]:
        base = self.root / "keys"
        if not base.is_dir():
            return []
        return sorted(p.stem for p in base.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
