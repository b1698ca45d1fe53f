"""The one interface every snapshot store implements.

A store holds three kinds of things:

* **blobs** — immutable bytes addressed by their SHA-256, so identical data is
  written once however many snapshots use it, and every read can be verified;
* **manifests** — one signed JSON document per snapshot, committed only after
  every blob it names is durable, and never overwritten;
* **records** — small JSON documents the server keeps (which notebook had
  which kernel when a notice came), overwritten freely.

Snapshots are only ever added or deleted whole, so a reader sees either the old
snapshot or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

from ..faults import fault_point
from ..threads import run_in_threads
from .errors import CorruptBlobError, ManifestError, MissingBlobError, StoreError
from .manifest import MANIFEST, ManifestSigner, snapshot_place

Buffer = Union[bytes, bytearray, memoryview]

log = logging.getLogger("jupyter_spot.store")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_SNAPSHOT_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
_RECORD_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
#: The longest file or folder name local disks and EFS take (NAME_MAX), in bytes.
MAX_COMPONENT_BYTES = 255
#: Where a long session name's folder name turns into its hash. ``quote`` never writes a ``%``
#: that is not followed by two hex digits, so no name that fits is ever encoded with it.
HASHED_MARK = "%~"
#: Percent-encoded characters of a long name kept, readable, before its hash.
READABLE_START = 60
#: Beside a long-named session's manifests: its real name, UTF-8.
SESSION_NAME_FILE = "session-name"
#: Records are small JSON documents; anything bigger is damage (or an attack on a reader's memory).
MAX_RECORD_BYTES = 4 << 20


def digest_of(data: Buffer) -> str:
    """The address of ``data`` in every store."""
    return hashlib.sha256(data).hexdigest()


def biggest_first(blobs: Sequence[Buffer]) -> list[int]:
    """Indexes of ``blobs``, biggest first."""
    return sorted(range(len(blobs)), key=lambda index: -memoryview(blobs[index]).nbytes)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise StoreError(f"not a blob address: {digest!r}")
    return digest


def check_snapshot_id(snapshot_id: str) -> str:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.match(snapshot_id):
        raise StoreError(f"not a snapshot id: {snapshot_id!r}")
    return snapshot_id


def check_record_name(name: str) -> str:
    if not isinstance(name, str) or not _RECORD_NAME.match(name):
        raise StoreError(f"not a record name: {name!r}")
    return name


_reported: set[tuple[str, str, str]] = set()
_reported_lock = threading.Lock()


def warn_once(where: str, what: str, message: str) -> None:
    """Log ``message`` once per store, thing and message, though servers re-read the store every poll."""
    key = (where, what, message)
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    log.warning("%s", message)


def report_bad_record(where: str, name: str, problem: str) -> None:
    """Warn (once) that a record is ignored, and why."""
    warn_once(where, name, f"jupyter-spot: record {name} in {where} is ignored: {problem}")


def parse_record(where: str, name: str, data: bytes) -> dict[str, Any] | None:
    """A record's bytes as a JSON object; None (absent) with one warning when they are anything else.

    Records sit in a shared store that any writer (or a crash mid-copy) may have
    left empty, truncated or of another shape; none of that may stop a server.
    """
    if not data:
        report_bad_record(where, name, "it is empty")
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError) as error:  # also UnicodeDecodeError; nested deeper than the parser goes
        report_bad_record(where, name, f"it is not valid JSON ({str(error)[:200]})")
        return None
    if not isinstance(record, dict):
        report_bad_record(where, name, f"it holds a JSON {type(record).__name__}, not an object")
        return None
    return record


def encode_session(session: str, limit: int = MAX_COMPONENT_BYTES) -> str:
    """A session name (often a notebook path) as one safe path component of at most ``limit`` bytes.

    Never contains ``/`` and never starts with ``.``, so no session name — however
    hostile — can point outside the store. A name that fits percent-encoded is
    kept as it is, so stores written before long names were mapped read the
    same. A longer one becomes a readable start, :data:`HASHED_MARK` and a hash
    of the whole name; the store keeps the name itself beside its manifests
    (:data:`SESSION_NAME_FILE`) so it is still listed under its real name.
    """
    if not isinstance(session, str) or not session or len(session) > 1024:
        raise StoreError(f"not a session name: {session!r}")
    try:
        encoded = urllib.parse.quote(session, safe="")
    except UnicodeEncodeError:
        raise StoreError(f"not a session name: {session!r}") from None
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) <= limit:
        return encoded
    start, length = "", 0
    for char in session:  # whole characters only, so the start still reads as text
        length += len(urllib.parse.quote(char, safe=""))
        if length > READABLE_START:
            break
        start += char
    start = urllib.parse.quote(start, safe="").replace(".", "%2E", 1 if start.startswith(".") else 0)
    return start + HASHED_MARK + hashlib.sha256(session.encode()).hexdigest()[:40]


def is_hashed_session(component: str) -> bool:
    """Whether a session folder's name is a long name's hash (its real name is in :data:`SESSION_NAME_FILE`)."""
    return HASHED_MARK in component


def decode_session(component: str) -> str:
    return urllib.parse.unquote(component)


def hashed_session_name(where: str, component: str, data: bytes, limit: int = MAX_COMPONENT_BYTES) -> str | None:
    """The real name of the session in folder ``component``, from its name file; None (one warning) if that
    file does not name a session which maps to this very folder — it cannot make a folder answer for another."""
    try:
        session = data.decode()
        if encode_session(session, limit) == component:
            return session
        problem = "it names a session that belongs in another folder"
    except (UnicodeDecodeError, StoreError):
        problem = "it does not hold a session name"
    warn_once(where, component, f"jupyter-spot: session folder {component} in {where} is skipped: its "
              f"{SESSION_NAME_FILE} file is damaged ({problem})")
    return None


class Store(ABC):
    """Blobs, manifests and records in one place (a directory, a bucket, …)."""

    #: Short name shown to users: "local", "s3", "tiered".
    kind: str = "store"
    #: Blobs a writer stores (or a restore reads) at once. A FileStore hashes a
    #: big blob on a second thread while writing it, so two keep two cores busy
    #: and one's fsync overlaps the other's hashing (measured: 1 GB in 3 arrays,
    #: 0.65 s with one at a time, 0.57 s with two); beyond that the disk is the
    #: limit. A remote store waits on the network and takes more.
    blob_workers: int = 2

    def __init__(self, url: str, signer: Any = None) -> None:
        self.url = url
        self.signer: ManifestSigner = signer or ManifestSigner.default()
        self.signer.bind_store(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- blobs ---------------------------------------------------------------
    @abstractmethod
    def has_blob(self, digest: str) -> bool:
        """Whether the blob is already stored (and so need not be written)."""

    @abstractmethod
    def put_blob(self, digest: str, data: Buffer) -> int:
        """Store ``data`` under ``digest``; durable when this returns.

        Returns the number of bytes written: 0 when the store already had it.
        """

    def add_blob(self, data: Buffer) -> tuple[str, int]:
        """Store ``data`` under its SHA-256, computed here; durable when this returns.

        Returns (digest, bytes written). This default hashes first because
        ``put_blob`` needs the address up front (S3 sends it as the checksum);
        a store that can hash while it writes overrides it (FileStore).
        """
        digest = digest_of(data)
        return digest, self.put_blob(digest, data)

    def add_blobs(
        self,
        blobs: Sequence[Buffer],
        added: Callable[[int, str, int], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Store every blob, ``blob_workers`` at a time, biggest first, so the workers finish together.

        Calls ``added(index, digest, bytes written)`` as each is durable. Once ``stop()`` is
        true no more are started; the first failure is raised. A store that can make
        many blobs durable at once overrides this (FileStore).
        """

        def add(index: int) -> None:
            added(index, *self.add_blob(blobs[index]))

        run_in_threads(add, biggest_first(blobs), self.blob_workers, "jupyter-spot-blob", stop)

    @abstractmethod
    def get_blob(self, digest: str) -> Buffer:
        """The blob's bytes, verified against ``digest``, as a *writable* buffer.

        Raises :class:`MissingBlobError` or :class:`CorruptBlobError`.
        """

    def read_blob_into(self, digest: str, out: memoryview) -> None:
        """Read the blob, verified against ``digest``, into ``out`` (exactly its size).

        Lets a restore rebuild a chunked buffer in one allocation. This default
        copies from :meth:`get_blob`; a store that can read in place overrides it.
        """
        data = memoryview(self.get_blob(digest)).cast("B")
        if data.nbytes != out.nbytes:
            raise CorruptBlobError(f"blob {digest[:12]} in {self.url} holds {data.nbytes} bytes, not {out.nbytes}")
        out.cast("B")[:] = data

    @abstractmethod
    def iter_blobs(self) -> Iterator[str]:
        """Every blob address in the store."""

    @abstractmethod
    def blob_age(self, digest: str) -> float:
        """Seconds since the blob was last written or re-used (``put_blob`` of
        a blob that exists counts as a use), so GC can spare blobs a snapshot
        in progress is about to reference."""

    @abstractmethod
    def delete_blob(self, digest: str) -> None:
        """Remove a blob; only garbage collection calls this."""

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """Which of ``digests`` the store lacks: existence checks only, never a re-hash.

        A store that remembers which blobs it wrote or checked since the last
        collection checks only the others (FileStore, S3Store).
        """
        return [digest for digest in dict.fromkeys(digests) if not self.has_blob(digest)]

    def collection_generation(self) -> str | None:
        """A cheap token that changes whenever a garbage collection deletes blobs.

        A writer that caches which blobs are stored (the kernel engine) drops its
        cache when this changes: the collection may have deleted any of them.
        None when the store has never been collected.
        """
        return None

    def announce_collection(self) -> None:
        """Change :meth:`collection_generation`; a collector calls it before its first deletion,
        so even a collector killed half-way makes writers re-check what they believed stored."""

    # -- manifests -----------------------------------------------------------
    @abstractmethod
    def _write_manifest(self, session: str, snapshot_id: str, data: bytes) -> None:
        """Write the encoded manifest atomically; raise SnapshotExistsError if present."""

    @abstractmethod
    def _read_manifest(self, session: str, snapshot_id: str) -> bytes:
        """The encoded manifest; raise ManifestError if absent."""

    @abstractmethod
    def list_sessions(self) -> list[str]:
        """Every session that has at least one snapshot."""

    def missing_reason(self) -> str | None:
        """Why a listing is empty because the store itself is not there yet; None if it is, or if this
        store cannot tell. Raises StoreError if it never can be there."""
        return None

    @abstractmethod
    def list_snapshots(self, session: str) -> list[str]:
        """The session's snapshot ids, oldest first."""

    @abstractmethod
    def delete_snapshot(self, session: str, snapshot_id: str) -> None:
        """Remove one snapshot's manifest (its blobs go at the next GC)."""

    def commit_manifest(self, manifest: dict[str, Any]) -> None:
        """Commit a snapshot: call only once every blob it names is durable.

        A caller may name blobs it stored long ago (the kernel engine remembers
        what is durable), so any a collection may have deleted since are checked
        first: a missing one raises :class:`MissingBlobError` (its ``digests``
        say which, to be stored again) instead of committing a dangling manifest.
        A collection that began between that check and the write is caught by
        its generation: the blobs are checked again, and a manifest that lost
        one is taken back before the error is raised.
        """
        session = manifest["session"]
        snapshot_id = check_snapshot_id(manifest["id"])
        blobs = manifest.get("blobs", [])
        for digest in blobs:
            check_digest(digest)
        fault_point("manifest-commit")
        generation = self.collection_generation()
        self._refuse_missing(snapshot_id, self.missing_blobs(blobs))
        fault_point("manifest-write")
        data = self.signer.encode(manifest, MANIFEST, snapshot_place(session, snapshot_id))
        self._write_manifest(session, snapshot_id, data)
        if self.collection_generation() != generation:
            missing = self.missing_blobs(blobs)
            if missing:
                self.delete_snapshot(session, snapshot_id)
                self._refuse_missing(snapshot_id, missing)

    def _refuse_missing(self, snapshot_id: str, missing: list[str]) -> None:
        if missing:
            raise MissingBlobError(
                f"snapshot {snapshot_id} was not committed: {len(missing)} blob(s) it names are not in "
                f"{self.url} (first: {missing[0][:12]}); store them again and retry",
                missing,
            )

    def load_manifest(self, session: str, snapshot_id: str) -> dict[str, Any]:
        """The verified manifest, signed for exactly this session and id; ManifestError names the snapshot if not."""
        check_snapshot_id(snapshot_id)
        where = f"snapshot {snapshot_id} of session {session!r}"
        data = self._read_manifest(session, snapshot_id)
        manifest = self.signer.decode(data, MANIFEST, snapshot_place(session, snapshot_id), where=where)
        if (manifest.get("session"), manifest.get("id")) != (session, snapshot_id):
            raise ManifestError(f"{where}: the manifest's body names snapshot {str(manifest.get('id'))[:140]} of "
                                f"session {str(manifest.get('session'))[:1100]!r}; refusing it")
        return manifest

    def latest_manifest(self, session: str) -> tuple[dict[str, Any] | None, list[str]]:
        """The newest manifest that loads, and why any newer ones did not.

        A truncated or tampered newest manifest must not cost the user the
        snapshot before it.
        """
        problems: list[str] = []
        for snapshot_id in reversed(self.list_snapshots(session)):
            try:
                return self.load_manifest(session, snapshot_id), problems
            except ManifestError as error:
                problems.append(str(error))
        return None, problems

    # -- records -------------------------------------------------------------
    @abstractmethod
    def put_record(self, name: str, data: dict[str, Any]) -> None:
        """Write (or replace) a small JSON record atomically."""

    @abstractmethod
    def get_record(self, name: str) -> dict[str, Any] | None:
        """The record, or None if there is none."""

    @abstractmethod
    def list_records(self) -> list[str]:
        """Names of every record."""

    # -- signing keys, wrapped by KMS (keys.py) -------------------------------
    def create_key_object(self, name: str, data: bytes) -> bool:
        """Write ``keys/<name>.json`` unless it exists (False then): the first writer's key wins."""
        raise StoreError(f"a {self.kind} store cannot keep KMS-wrapped signing keys")

    def read_key_object(self, name: str) -> bytes | None:
        """The key object, or None if there is none."""
        return None

    def list_key_objects(self) -> list[str]:
        """Names of every key object."""
        return []

    # -- health --------------------------------------------------------------
    @abstractmethod
    def check_writable(self) -> None:
        """Raise StoreError with a clear reason if this store cannot take writes."""
