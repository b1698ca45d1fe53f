"""Big out-of-band buffers as fixed-size chunks, so a snapshot writes only what changed.

A buffer larger than one chunk (a 1 GiB array, a pandas block, bytes) is cut at
multiples of the chunk size; each piece is an ordinary content-addressed blob,
found unchanged by its xxh3 content key, so one changed element costs one chunk.
A restore rebuilds each chunked buffer into one allocation, reading its chunks
in parallel straight into place, and verifies every chunk before anything is
unpickled.

In a manifest (format 2) a group's ``buffers`` list holds, for each buffer,
either the digest of one blob (a buffer no larger than a chunk; every buffer of
a format-1 manifest) or ``{"size": bytes, "chunk_size": bytes, "chunks":
[digest, …]}`` — the last chunk is shorter when the size is not a multiple. Every
chunk's digest is listed in the manifest's ``blobs`` too, so GC keeps a chunk
while any committed manifest names it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..store import CorruptBlobError, Store, StoreError, digest_of
from ..threads import run_in_threads

#: The manifest format this code writes; it reads this one and every older one.
MANIFEST_FORMAT = 2

#: Measured on this project's 2-core VM (benchmarks/README.md): at 4 MiB a 1 GiB
#: first snapshot still writes at the disk's pace, and a one-element change writes 4 MiB.
DEFAULT_CHUNK_SIZE = 4 << 20

#: Below this a chunk costs more in files, fsyncs and manifest entries than it saves.
MIN_CHUNK_SIZE = 4 << 10


def resolve_chunk_size(configured: int) -> tuple[int, str | None]:
    """The chunk size to use, and why the configured one was not (None if it was). 0 turns chunking off."""
    if configured == 0 or configured >= MIN_CHUNK_SIZE:
        return configured, None
    return DEFAULT_CHUNK_SIZE, (f"chunk_size {configured} is below the minimum of {MIN_CHUNK_SIZE} bytes "
                                f"(0 turns chunking off); using {DEFAULT_CHUNK_SIZE}")


def cut(buffer: memoryview, chunk_size: int) -> list[memoryview]:
    """``buffer`` (bytes, 1-D) as views of at most ``chunk_size`` bytes; itself when it fits in one."""
    if chunk_size <= 0 or buffer.nbytes <= chunk_size:
        return [buffer]
    return [buffer[start : start + chunk_size] for start in range(0, buffer.nbytes, chunk_size)]


@dataclass(frozen=True)
class Layout:
    """How one out-of-band buffer is stored: one blob (``chunk_size`` 0) or its chunks."""

    size: int
    chunk_size: int
    pieces: tuple[tuple[str, int], ...]  # (content key, size), in order

    def entry(self, durable: dict[str, str]) -> str | dict[str, Any]:
        """The manifest's entry for this buffer, content keys resolved to digests."""
        digests = [durable[key] for key, _ in self.pieces]
        if not self.chunk_size:
            return digests[0]
        return {"size": self.size, "chunk_size": self.chunk_size, "chunks": digests}


def entry_digests(entry: Any) -> list[str]:
    """Every blob a manifest's buffer entry names."""
    return [entry] if isinstance(entry, str) else list(entry["chunks"])


def _check_entry(entry: Any, where: str) -> None:
    """A chunked entry must describe its buffer exactly, or the restore refuses the snapshot."""
    if isinstance(entry, str):
        return
    try:
        size, chunk_size, chunks = entry["size"], entry["chunk_size"], entry["chunks"]
        valid = (
            type(size) is int and type(chunk_size) is int and isinstance(chunks, list)
            and chunk_size > 0 and size > 0 and len(chunks) == -(-size // chunk_size)
            and all(isinstance(digest, str) for digest in chunks)
        )
    except (KeyError, TypeError):
        valid = False
    if not valid:
        raise StoreError(f"{where}: a chunked buffer entry is malformed")


class SnapshotBytes:
    """Every blob and buffer a manifest names, read and verified, ready to unpickle."""

    def __init__(
        self, blobs: dict[str, Any], buffers: dict[tuple[str, int], Any], chunked: list[tuple[Any, dict[str, Any]]]
    ) -> None:
        self.blobs = blobs  # digest → bytes of each whole blob
        self._buffers = buffers  # (group name, index) → that buffer's bytes
        self._chunked = chunked  # (assembled buffer, its manifest entry)

    def buffers(self, group_name: str, group: dict[str, Any]) -> list[Any]:
        return [self._buffers[(group_name, index)] for index in range(len(group["buffers"]))]

    def content_keys(self, content_key: Callable[[Any], str]) -> Iterator[tuple[str, str]]:
        """(content key, digest) of every blob and chunk read, for the engine's ``durable``."""
        for digest, data in self.blobs.items():
            yield content_key(data), digest
        for buffer, entry in self._chunked:
            view = memoryview(buffer)
            for index, digest in enumerate(entry["chunks"]):
                start = index * entry["chunk_size"]
                yield content_key(view[start : start + entry["chunk_size"]]), digest


def read_snapshot(store: Store, manifest: dict[str, Any]) -> SnapshotBytes:
    """Read everything ``manifest`` needs to restore; raise StoreError (nothing loaded) if any is bad.

    Whole blobs come from ``get_blob``. Each chunked buffer is one anonymous
    mapping (no zero-fill up front) its chunks are mapped or read into,
    ``store.blob_workers`` at a time (``_chunk_reader``). A buffer named twice gets
    its own memory each time: two equal arrays must not come back sharing it.
    """
    where = f"snapshot {manifest.get('id')}"
    format_ = manifest.get("manifest_format", 1)
    if not isinstance(format_, int) or format_ > MANIFEST_FORMAT:
        raise StoreError(f"{where} was written by a newer jupyter-spot (manifest format {str(format_)[:20]}; this "
                         f"one reads up to {MANIFEST_FORMAT}): upgrade jupyter-spot to restore it")
    whole: dict[str, Any] = {}
    buffers: dict[tuple[str, int], Any] = {}
    chunked: list[tuple[Any, dict[str, Any]]] = []
    tasks: list[tuple[str, memoryview, bool]] = []

    def blob(digest: str) -> Any:
        if digest not in whole:
            whole[digest] = store.get_blob(digest)
        return whole[digest]

    try:
        _plan(manifest, where, blob, buffers, chunked, tasks)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as error:
        raise StoreError(f"{where}: its groups are malformed ({type(error).__name__}: {str(error)[:80]})") from None
    _read_in_parallel(_chunk_reader(store), tasks, store.blob_workers)
    return SnapshotBytes(whole, buffers, chunked)


def _plan(
    manifest: dict[str, Any],
    where: str,
    blob: Callable[[str], Any],
    buffers: dict[tuple[str, int], Any],
    chunked: list[tuple[Any, dict[str, Any]]],
    tasks: list[tuple[str, memoryview, bool]],
) -> None:
    """Read the whole blobs ``manifest`` names; allocate each chunked buffer and list its chunks' reads."""
    used: set[str] = set()
    for name, group in manifest.get("groups", {}).items():
        blob(group["blob"])
        for index, entry in enumerate(group["buffers"]):
            _check_entry(entry, where)
            if isinstance(entry, str):
                data = blob(entry)
                buffers[(name, index)] = bytearray(data) if entry in used else data
                used.add(entry)
                continue
            memory = mmap.mmap(-1, entry["size"])
            view = memoryview(memory)
            # only page-sized chunks may be mapped in place: a mapping covers whole pages
            mappable = entry["chunk_size"] % mmap.PAGESIZE == 0
            for number, digest in enumerate(entry["chunks"]):
                start = number * entry["chunk_size"]
                tasks.append((digest, view[start : start + entry["chunk_size"]], mappable))
            buffers[(name, index)] = memory
            chunked.append((memory, entry))
    if manifest.get("rng"):
        blob(manifest["rng"])


def _read_in_parallel(
    read: Callable[[str, memoryview, bool], None], tasks: list[tuple[str, memoryview, bool]], workers: int
) -> None:
    """``read(digest, place, mappable)`` for each task, ``workers`` at a time; raise the first failure."""
    try:
        run_in_threads(lambda task: read(*task), tasks, workers, "jupyter-spot-read")
    except StoreError:
        raise
    except Exception as error:
        raise StoreError(f"{type(error).__name__}: {error}") from error


def _chunk_reader(store: Store) -> Callable[[str, memoryview, bool], None]:
    """How to put a chunk in place: map its file there (a local store) or ``store.read_blob_into``.

    Mapping a chunk's file copy-on-write over its place in the buffer costs no
    copy — as cheap as the whole-blob mmap restores used before chunks; a read
    copies every byte once more (benchmarks/README.md). Either way the bytes in
    place are verified against the chunk's SHA-256 before anything is unpickled.
    """
    blob_file = getattr(store, "blob_file", None)
    mapper = _fixed_mapper() if blob_file is not None else None

    def read(digest: str, place: memoryview, mappable: bool) -> None:
        if mapper is None or not mappable or not _map_chunk(mapper, blob_file(digest), place):
            store.read_blob_into(digest, place)
            return
        if digest_of(place) != digest:
            raise CorruptBlobError(f"blob {digest[:12]} in {store.url} is corrupt (its checksum does not match)")

    return read


def _fixed_mapper() -> Any:
    """libc's ``mmap``, to map a file at a given address inside a mapping we own; None where unavailable."""
    if os.name != "posix" or not hasattr(mmap, "MAP_PRIVATE"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_void_p
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return function


#: ``MAP_FIXED``: the same value on Linux and macOS.
_MAP_FIXED = 0x10


def _map_chunk(mapper: Any, path: Any, place: memoryview) -> bool:
    """Map the chunk file ``path`` copy-on-write exactly over ``place``; False if it cannot be (then it is read).

    ``place`` lies in an anonymous mapping this module made (``read_snapshot``) and
    starts on a page, so the new mapping replaces only pages of that buffer; its
    size was checked first, so no page of it lies beyond the file's end.
    """
    address = ctypes.addressof(ctypes.c_char.from_buffer(place))
    if address % mmap.PAGESIZE:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # missing, unreadable: read_blob_into says so in the store's words
        return False
    try:
        if os.fstat(fd).st_size != place.nbytes:
            return False  # read_blob_into says what is wrong with it
        mapped = mapper(address, place.nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if mapped != address:
            raise OSError(ctypes.get_errno(), "mmap did not map the chunk in place")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
