"""Files ↔ the store, for shell jobs: the checkpoint directory and the output files.

``$SPOT_CHECKPOINT_DIR`` follows the contract SageMaker's managed spot training
made familiar: the program writes its progress there, the runner copies the
directory to the store now and then, and a re-run starts with the directory as
last copied. Each sync stores only the files whose size, mtime or inode changed
(content-addressed blobs, so an unchanged file is never sent twice) and then
replaces one signed listing, bound to the job, that a re-run trusts and nothing
else. A program that rewrites a file in place may be caught mid-write; writing a
temporary file and renaming it over the old one is always safe.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from ..store import Store
from ..store.manifest import JOB_CHECKPOINT_FILES
from . import record

#: relative path → {"blob": digest, "size": bytes, "mode": permission bits}
Listing = dict[str, dict[str, Any]]


def safe_relative(name: str) -> PurePosixPath:
    """``name`` as a path that stays inside the directory it is relative to; ValueError if it does not."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise ValueError(f"{name!r} is not a path inside the notebook's directory")
    return path


def store_file(store: Store, path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"blob": store.add_blob(data)[0], "size": len(data), "mode": path.stat().st_mode & 0o777}


def write_file(store: Store, entry: dict[str, Any], target: Path) -> None:
    """Write a stored file in place atomically (a reader never sees half of it)."""
    data = store.get_blob(entry["blob"])  # verified against its address by the store
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.spot-{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, int(entry.get("mode", 0o644)) & 0o777)
    os.replace(temporary, target)


def store_outputs(store: Store, directory: Path, names: list[str]) -> Listing:
    """The output files, stored; ValueError naming every one that is missing or not a file."""
    missing = [name for name in names if not (directory / safe_relative(name)).is_file()]
    if missing:
        raise ValueError(f"--outputs {', '.join(missing)}: not written by the job (no such file in {directory})")
    return {name: store_file(store, directory / safe_relative(name)) for name in names}


def put_back(store: Store, files: Listing, directory: Path) -> list[Path]:
    """Write a job's output files into ``directory``; the paths written."""
    written = []
    for name, entry in files.items():
        target = directory / safe_relative(name)
        write_file(store, entry, target)
        written.append(target)
    return written


class CheckpointDirectory:
    """One job's ``$SPOT_CHECKPOINT_DIR`` and its copy in the store."""

    def __init__(self, store: Store, session: str, job_id: str, directory: Path) -> None:
        self.store, self.session, self.job_id, self.directory = store, session, job_id, directory
        self.lock = threading.Lock()  # the sync timer, the SIGTERM path and the exit path take turns
        self.listing: Listing = {}
        self._stat: dict[str, tuple[int, int, int]] = {}  # what each listed file looked like when stored
        self.syncs = 0

    def _saved(self) -> Listing | None:
        saved = self.store.get_record(record.checkpoint_name(self.job_id))
        if saved is None:
            return None
        signed = saved.get("files") if isinstance(saved, dict) else None
        return record.verify(self.store, signed, JOB_CHECKPOINT_FILES, self.session, self.job_id)

    def restore(self) -> int:
        """Empty the directory and put back the last synced files; how many."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.rglob("*"), reverse=True):  # files before their folders
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        listing = self._saved() or {}
        for name, entry in listing.items():
            target = self.directory / safe_relative(name)
            write_file(self.store, entry, target)
            self._stat[name] = _fingerprint(target)
        self.listing = dict(listing)
        return len(listing)

    def sync(self, reason: str) -> bool:
        """Store the files changed since the last sync and the new listing; whether anything changed."""
        with self.lock:
            listing: Listing = {}
            for path in sorted(self.directory.rglob("*")):
                if not path.is_file() or path.is_symlink():
                    continue
                name = path.relative_to(self.directory).as_posix()
                fingerprint = _fingerprint(path)
                if self._stat.get(name) == fingerprint and name in self.listing:
                    listing[name] = self.listing[name]
                    continue
                try:
                    listing[name] = store_file(self.store, path)
                except FileNotFoundError:  # removed while we looked: it is not part of this sync
                    continue
                self._stat[name] = fingerprint
            if listing == self.listing and self.syncs:
                return False
            self.syncs += 1
            self.store.put_record(record.checkpoint_name(self.job_id), {
                "id": self.job_id, "saved": record.now(),
                "progress": f"{len(listing)} file(s) synced at {record.now()} ({reason})",
                "files": record.sign(self.store, listing, JOB_CHECKPOINT_FILES, self.session, self.job_id),
                "blobs": sorted({entry["blob"] for entry in listing.values()}),
            })
            self.listing = listing
            self._stat = {name: stat for name, stat in self._stat.items() if name in listing}
            return True


def _fingerprint(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino
