"""Writing a file so that it is durable, fast: the pieces FileStore builds on.

Bytes go to the disk in 1 MiB calls, handed to it every 16 MiB rather than all
at the fsync, while a second thread hashes them; a directory is fsynced after a
rename so the name is durable too.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from .base import Buffer, digest_of

#: Blobs at least this big are hashed on a second thread while this one writes
#: them; below it a thread costs more than the overlap saves.
HASH_ASIDE_MIN = 1 << 20

#: Bytes per ``write`` call. Measured on ext4 in a Linux 6.18 VM: a 333 MB array
#: in one call often took 0.7-1.1 s, in 1 MiB calls 0.08-0.1 s every time.
WRITE_CHUNK = 1 << 20

#: While a big file is written, every this many bytes are sent to the disk at
#: once instead of all at the final fsync, so the disk works while the rest is
#: hashed and written, and the rest once written (a batch of chunks is fsynced only
#: after all are written). ``posix_fadvise(DONTNEED)`` starts that writeback on
#: Linux (PostgreSQL's ``*_flush_after`` falls back to the same call); pages
#: still being written stay cached, and the fsync remains the guarantee.
WRITEBACK_EVERY = 16 << 20


def fsync_dir(path: Path) -> None:
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


def write_all(fd: int, data: Buffer) -> None:
    """Write ``data`` to a new file from its start, handing it to the disk as it goes and at the end."""
    view = memoryview(data).cast("B")
    written = sent = 0
    while written < view.nbytes:
        written += os.write(fd, view[written : written + WRITE_CHUNK])
        if (written - sent >= WRITEBACK_EVERY or written == view.nbytes) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, sent, written - sent, os.POSIX_FADV_DONTNEED)
            sent = written


def sha256_during(view: memoryview, work: Callable[[], None]) -> str:
    """The SHA-256 of ``view``, computed on a second thread while ``work()`` runs.

    hashlib releases the GIL on big buffers and ``os.write`` always does, so
    hashing a blob while writing it costs the longer of the two, not their sum.
    A plain thread, not a concurrent.futures pool: those refuse work once the
    interpreter begins to exit, and the kernel's exit flush writes blobs then.
    """
    if view.nbytes < HASH_ASIDE_MIN:
        work()
        return digest_of(view)
    found: list[str | BaseException] = []

    def hash_view() -> None:
        try:
            found.append(digest_of(view))
        except BaseException as error:  # raised on the caller's thread below
            found.append(error)

    hasher = threading.Thread(target=hash_view, name="jupyter-spot-sha256", daemon=True)
    hasher.start()
    try:
        work()
    finally:
        hasher.join()
    outcome = found[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def write_durably(target: Path, data: Buffer) -> Path:
    """Write ``data`` to a fresh temporary file beside ``target``; fsynced."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp
