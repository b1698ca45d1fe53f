"""Writers and garbage collectors of one S3 store never overlap: the lease protocol.

A blob this process knows is stored costs no request at all, which is what
makes an unchanged snapshot nearly free.  Garbage collection can only break
that if it deletes a blob a writer believes in, so writers and collectors
coordinate through lease objects (the protocol restic uses for its locks;
S3 lists are strongly consistent): a writer puts its lease *then* lists the
locks, a collector puts its lock *then* lists the leases, so at least one of
them sees the other.  A collector that sees a live lease deletes no more
blobs and stops reading manifests (it looks again every second); a writer
that sees a live collector waits for it — a bounded wait, with locks aged
by S3's clock (the Date of the listing), so a dead collector's lock never
blocks it for long — drops its cache of known blobs whenever the collection
generation changed, and checks before committing any blob it has not seen
since.

    locks/write-<token>          a writer's lease, held while it stores a snapshot
    locks/gc-<token>             a garbage collector's lock
    locks/gc-generation          rewritten before a collection deletes its first blob
"""

from __future__ import annotations

import contextlib
import email.utils
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from .errors import StoreError
from .s3_objects import S3Objects

#: A writer's lease older than this belongs to a process that died and is
#: ignored; a live writer refreshes it on use well before.
LEASE_SECONDS = 10 * 60
#: The same for a collector's lock, which a live collector refreshes every second
#: (between manifests, blobs and deletions). Short, because a dead collector's lock
#: holds writers back until it expires, and GCP and Azure give a notice only 30 s.
GC_LOCK_SECONDS = 10
#: The longest a writer waits for collectors' locks to go. A live collector
#: yields within about a second of seeing the writer's lease and a dead one's
#: lock expires after GC_LOCK_SECONDS, so a lock still live after this belongs to
#: a collector that does not yield: the writer fails with an error naming it.
GC_WAIT_SECONDS = GC_LOCK_SECONDS + 15.0
#: How often a waiting writer looks at the locks again.
GC_POLL_SECONDS = 0.2


#: ``S3Leases._gc_generation`` before the store first looked at it.
_NOT_LOOKED = "not looked yet"


class S3Leases(S3Objects):
    """The writer's lease and the collector's lock of one store."""

    _known: set[str]  # the blobs this writer believes stored: dropped when a collection ran

    def _init_leases(self) -> None:
        self._lock = threading.Lock()
        self._lease_key = f"{self.prefix}locks/write-{secrets.token_hex(8)}"
        self._lease_taken = 0.0  # time.monotonic() of the lease PUT; 0 when not held
        self._gc_generation: str | None = _NOT_LOOKED
        self._generation_key = self._key("locks", "gc-generation")

    def _live_locks(self) -> dict[str, list[str]]:
        """Live ``write``/``gc`` lock keys, aged by S3's clock: the Date of this very
        listing (or, from a store that sends none, the newest lock, since we just wrote one)."""
        items: list[dict[str, Any]] = []
        now = None
        for page in self._list(self._key("locks", "")):
            items += page.get("Contents", [])
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            with contextlib.suppress(TypeError, ValueError):
                now = email.utils.parsedate_to_datetime(date) if date else now
                if now is not None and now.tzinfo is None:  # a "-0000" zone parses as naive: it is UTC
                    now = now.replace(tzinfo=timezone.utc)
        newest = max((item["LastModified"] for item in items), default=datetime.now(timezone.utc))
        now = max(now, newest) if now is not None else newest
        live: dict[str, list[str]] = {"write": [], "gc": []}
        for item in items:
            kind = item["Key"].rsplit("/", 1)[-1].split("-", 1)[0]
            ttl = {"write": LEASE_SECONDS, "gc": GC_LOCK_SECONDS}.get(kind)
            if ttl and item["Key"] != self._generation_key and (now - item["LastModified"]).total_seconds() < ttl:
                live[kind].append(item["Key"])
        return live

    def _hold_lease(self) -> None:
        """Take (or refresh) this writer's lease before it relies on any blob."""
        with self._lock:
            now = time.monotonic()
            if self._lease_taken and now - self._lease_taken < LEASE_SECONDS / 3:
                return
            waited = self._wait_for_collectors()
            self._lease_taken = now
            generation = self._read_generation()
            if waited or generation != self._gc_generation:
                self._known.clear()  # a collection deleted blobs: believe only S3 now
                self._gc_generation = generation

    def _wait_for_collectors(self) -> bool:
        """Put this writer's lease, then wait until no collector's lock is live; True if it waited.

        A live collector stops within about a second of seeing the lease. The
        lease is put again every second while waiting, so it stays live and, on a
        store whose listings carry no Date, the newest lock's time moves on.
        Raises StoreError once GC_WAIT_SECONDS have passed.
        """
        started = time.monotonic()
        put_at: float | None = None
        waited = False
        while True:
            if put_at is None or time.monotonic() - put_at >= 1.0:
                with self._calling("taking a write lease"):
                    self.client.put_object(Bucket=self.bucket, Key=self._lease_key, Body=b"")
                put_at = time.monotonic()
            collectors = self._live_locks()["gc"]
            if not collectors:
                return waited
            waited = True
            seconds = time.monotonic() - started
            if seconds >= GC_WAIT_SECONDS:
                with contextlib.suppress(StoreError), self._calling("dropping the write lease"):
                    self.client.delete_object(Bucket=self.bucket, Key=self._lease_key)
                raise StoreError(
                    f"a garbage collector's lock ({collectors[0]}) in {self.url} stayed live for {seconds:.0f}s while "
                    "this writer waited to store a snapshot; nothing was written. A collector that does not make way "
                    "for writers is running: stop it, or delete that lock if no `jupyter spot gc` runs"
                )
            time.sleep(GC_POLL_SECONDS)

    def _read_generation(self) -> str | None:
        head = self._head(self._generation_key)
        return head["ETag"] if head else None

    def collection_generation(self) -> str | None:
        """The generation this store saw when it last took a lease (read once if it never did):
        a writer's lease re-reads it, so this costs no request per snapshot."""
        if self._gc_generation == _NOT_LOOKED:
            self._gc_generation = self._read_generation()
        return self._gc_generation

    def announce_collection(self) -> None:
        with self._calling("announcing a garbage collection"):
            self.client.put_object(Bucket=self.bucket, Key=self._generation_key, Body=secrets.token_hex(8).encode())

    def _release_lease(self) -> None:
        with self._lock:
            if not self._lease_taken:
                return
            self._lease_taken = 0.0
            with self._calling("releasing the write lease"):
                self.client.delete_object(Bucket=self.bucket, Key=self._lease_key)

    @contextlib.contextmanager
    def blob_gc_guard(self) -> Iterator[Callable[[], bool]]:
        """Hold the collector's lock; yields ``may_delete()``, False once a writer holds a lease.

        ``may_delete`` re-checks (and refreshes the lock) at most once a second,
        so a writer that arrives mid-collection waits about a second, not the
        whole collection.
        """
        key = self._key("locks", f"gc-{secrets.token_hex(8)}")
        checked, allowed = 0.0, True

        def may_delete() -> bool:
            nonlocal checked, allowed
            if allowed and time.monotonic() - checked >= 1.0:
                with self._calling("refreshing the garbage collection lock"):
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
                allowed = not self._live_locks()["write"]
                checked = time.monotonic()
            return allowed

        try:
            yield may_delete
        finally:
            with self._calling("releasing the garbage collection lock"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
